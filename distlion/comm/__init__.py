"""Communication: the sign exchanges and their byte counters."""

from distlion.comm.exchange import (AllGatherExchange, LocalExchange, SignExchange, TwoPhaseExchange,
                                    choose_exchange, make_exchange)
from distlion.comm.stats import CommStats, ring_allreduce_bytes

__all__ = ["AllGatherExchange", "CommStats", "LocalExchange", "SignExchange", "TwoPhaseExchange",
           "choose_exchange", "make_exchange", "ring_allreduce_bytes"]
