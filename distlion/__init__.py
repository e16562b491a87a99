"""distlion: data-parallel Lion that sends 1 bit per parameter and votes."""

from distlion.comm import CommStats
from distlion.comm.flat import CollectiveError
from distlion.optim import DistLion
from distlion.integrations.common import unwrap
from distlion.integrations.torchrun import load, save, scaler_step

__all__ = ["CollectiveError", "CommStats", "DistLion", "load", "save", "scaler_step", "unwrap"]
__version__ = "0.1.0"
