"""distlion: data-parallel Lion that sends 1 bit per parameter and votes."""

from distlion.comm import CommStats
from distlion.optim import DistLion

__all__ = ["CommStats", "DistLion"]
__version__ = "0.1.0"
