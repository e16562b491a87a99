"""Communication: the sign exchanges between voters, the collectives inside a node, byte counters."""

from distlion.comm.exchange import (AllGatherExchange, LocalExchange, SignExchange, TwoPhaseExchange,
                                    choose_exchange, make_exchange)
from distlion.comm.node import LocalNode, NodeCollectives, NodeShards, make_node
from distlion.comm.stats import CommStats, ring_allreduce_bytes

__all__ = ["AllGatherExchange", "CommStats", "LocalExchange", "LocalNode", "NodeCollectives", "NodeShards",
           "SignExchange", "TwoPhaseExchange", "choose_exchange", "make_exchange", "make_node",
           "ring_allreduce_bytes"]
