"""Inside a node: reduce-scatter the gradients, agree on a skip, all-gather the parameters.

A node of G ranks votes as one worker (docs/design.md §6). For each bucket:

- ``reduce_start`` launches the reduce-scatter of this rank's flat gradient without
  waiting; ``reduce_finish`` waits and returns chunk j of the node's mean gradient
  (rank j of the node owns chunk j);
- ``agree`` takes the elementwise MAX of a small int64 vector over the node (one tiny
  collective per step: the skip flags and the step's digest, ``distlion.agreement``),
  so every rank of every node skips, or raises, together;
- ``gather_start`` launches the all-gather of the updated chunk j into the full
  parameter buffer, in place; ``gather_finish`` waits for every bucket's.

``LocalNode`` is G = 1: the chunk is the whole bucket and nothing moves.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.comm.flat import all_gather_flat, flag_device, reduce_scatter_flat, wait_for
from distlion.comm.stats import CommStats
from distlion.topology import chunk_of


class NodeShards(Protocol):
    ranks_per_node: int

    def reduce_start(self, bucket: int, flat_grads: Tensor, chunk_out: Tensor) -> None:
        """Launch the reduce-scatter of ``flat_grads`` into ``chunk_out``; leave both alone until finish."""
        ...

    def reduce_finish(self, bucket: int) -> Tensor:
        """Wait for ``bucket``'s reduce-scatter and return the chunk: the mean over the node's ranks."""
        ...

    def agree(self, values: Tensor) -> Tensor:
        """Return ``values`` (an int64 vector) with each entry the MAX over the ranks of the node."""
        ...

    def gather_start(self, bucket: int, params: Tensor) -> None:
        """Launch the all-gather of this rank's chunk of ``params`` into all of ``params``."""
        ...

    def gather_finish(self) -> None:
        """Wait for every all-gather launched since the last call."""
        ...


class LocalNode:
    """One rank per node: nothing to reduce or gather."""

    ranks_per_node = 1

    def reduce_start(self, bucket, flat_grads, chunk_out):
        raise RuntimeError("a node of one rank has no gradient to reduce")

    def reduce_finish(self, bucket):
        raise RuntimeError("a node of one rank has no gradient to reduce")

    def agree(self, values):
        return values

    def gather_start(self, bucket, params):
        pass

    def gather_finish(self):
        pass


class NodeCollectives:
    """G > 1 ranks per node: rank j reduces and owns chunk j of every bucket."""

    def __init__(self, group: Any, local_rank: int, stats: CommStats, timeout=None):
        self.group = group
        self.timeout = timeout
        self.ranks_per_node = dist.get_world_size(group)
        self.local_rank = local_rank
        self.stats = stats
        self._reducing: dict[int, tuple[Any, Tensor]] = {}
        self._gathering: list[Any] = []
        self._device = flag_device(group)
        self._polled = dist.get_backend(group) == "gloo"  # gloo's reduce-scatter wait ignores a timeout

    def reduce_start(self, bucket, flat_grads, chunk_out):
        work = reduce_scatter_flat(chunk_out, flat_grads, self.group, async_op=True)
        self._reducing[bucket] = (work, chunk_out)
        moved = (self.ranks_per_node - 1) * chunk_out.numel() * chunk_out.element_size()
        self.stats.count_intra_node(sent=moved, received=moved)

    def reduce_finish(self, bucket):
        work, chunk = self._reducing.pop(bucket)
        wait_for(work, f"the node's reduce-scatter of bucket {bucket}", self.timeout, poll=self._polled)
        return chunk.div_(self.ranks_per_node)  # the sum over the node's ranks -> their mean

    def agree(self, values):
        wire = values.to(self._device, copy=True)
        wait_for(dist.all_reduce(wire, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
                 "the node's agreement on a skip", self.timeout)
        moved = (self.ranks_per_node - 1) * wire.numel() * wire.element_size()
        self.stats.count_intra_node(sent=moved, received=moved)
        return wire.to(values.device)

    def gather_start(self, bucket, params):
        mine = chunk_of(params, self.ranks_per_node, self.local_rank)
        self._gathering.append(all_gather_flat(params, mine, self.group, async_op=True))
        moved = (self.ranks_per_node - 1) * mine.numel() * mine.element_size()
        self.stats.count_intra_node(sent=moved, received=moved)

    def gather_finish(self):
        for work in self._gathering:
            wait_for(work, "the node's all-gather of the parameters", self.timeout)
        self._gathering.clear()


def make_node(topology, stats: CommStats, device: torch.device, timeout=None) -> NodeShards:
    """Build the node collectives of ``topology`` (a ``distlion.topology.NodeTopology``) for buckets on ``device``."""
    if topology.ranks_per_node == 1:
        return LocalNode()
    if device.type == "cuda" and dist.get_backend(topology.node_group) != "nccl":
        raise ValueError(f"ranks_per_node={topology.ranks_per_node} with CUDA parameters needs the NCCL backend "
                         f"for the node's reduce-scatter and all-gather, got {dist.get_backend(topology.node_group)!r}: "
                         f"init_process_group('nccl'), or use ranks_per_node=1")
    return NodeCollectives(topology.node_group, topology.local_rank, stats, timeout)
