"""distlion: data-parallel Lion that sends 1 bit per parameter and votes."""

from distlion.comm import CommStats
from distlion.comm.flat import CollectiveError
from distlion.checkpoint import load, save
from distlion.optim import DistLion
from distlion.wrappers import unwrap

__all__ = ["CollectiveError", "CommStats", "DistLion", "load", "save", "unwrap"]
__version__ = "0.1.0"
