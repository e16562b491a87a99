"""DDP comm hooks that count the bytes of DDP's gradient all-reduce.

DistLion counts its own payload (``optimizer.comm_stats``); these hooks count DDP's
the same way, per rank and per collective, so the two are compared on one footing.
Each hook does exactly what DDP's built-in hook does (``allreduce_hook`` for fp32,
``bf16_compress_hook`` for bf16) and adds what one rank sends in a bandwidth-optimal
(ring) all-reduce of the bucket: 2*(N-1)/N of its bytes.

    counter = AllReduceCounter.for_group(None)
    ddp_model.register_comm_hook(counter, counting_allreduce_hook)
    ...
    counter.bytes_sent  # cumulative, this rank
"""

# No ``from __future__ import annotations``: DDP checks the hooks' annotations as objects.
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks

from distlion.comm import ring_allreduce_bytes  # the formula DistLion's comm_stats uses


@dataclass
class AllReduceCounter:
    """Hook state: the group DDP reduces over and what this rank has sent so far."""

    process_group: Any
    world_size: int
    bytes_sent: int = 0
    collectives: int = 0

    @classmethod
    def for_group(cls, process_group: Any = None) -> "AllReduceCounter":
        return cls(process_group, dist.get_world_size(process_group))

    def count(self, numel: int, element_size: int) -> None:
        self.bytes_sent += ring_allreduce_bytes(numel * element_size, self.world_size)
        self.collectives += 1


def counting_allreduce_hook(state: AllReduceCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default fp32 all-reduce, counted."""
    state.count(bucket.buffer().numel(), bucket.buffer().element_size())
    return default_hooks.allreduce_hook(state.process_group, bucket)


def counting_bf16_hook(state: AllReduceCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's bf16-compressed all-reduce (gradients cast to bf16 on the wire), counted."""
    state.count(bucket.buffer().numel(), torch.finfo(torch.bfloat16).bits // 8)
    return default_hooks.bf16_compress_hook(state.process_group, bucket)


HOOKS = {"fp32": counting_allreduce_hook, "bf16": counting_bf16_hook}


class DeferredAllReduce:
    """Hook state that moves DDP's fp32 all-reduce out of backward, to run on demand.

    The hook records each bucket and hands it back unreduced; ``run()`` then all-reduces
    the recorded buckets (the same buckets and collectives as DDP's default hook) and
    averages them. Register it on a DDP built with ``gradient_as_bucket_view=True``, so
    that the buckets are the gradients' storage. Benchmarks use it to time DDP's
    communication apart from its backward pass.
    """

    def __init__(self, counter: AllReduceCounter):
        self.counter = counter
        self.buckets: list[torch.Tensor] = []

    def run(self) -> None:
        for bucket in self.buckets:
            self.counter.count(bucket.numel(), bucket.element_size())
            dist.all_reduce(bucket, group=self.counter.process_group)
            bucket.div_(self.counter.world_size)
        self.buckets.clear()


def deferring_hook(state: DeferredAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Record the bucket for ``state.run()`` and return it unreduced."""
    state.buckets.append(bucket.buffer())
    return debugging_hooks.noop_hook(None, bucket)
