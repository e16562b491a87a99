"""Node chunks: a node's G ranks vote as one worker (docs/design.md §6).

Gradients come in through an intra-node reduce-scatter (rank j of the node gets chunk j
of the node's mean gradient), rank j packs, votes on and applies chunk j only, and the
updated parameters go out through an intra-node all-gather. At most two whole-bucket
staging buffers per device carry the reduce-scatters: bucket i uses buffer i % 2, so
bucket i + 2 is gathered while bucket i + 1 is reduced, and the node's gradients take
two buckets of memory (one with a single bucket), not the whole model's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distlion.buckets import Bucket
from distlion.layouts.base import Layout

IN_FLIGHT = 2  # reduce-scatters launched ahead of the pack: one staging buffer each


class NodeLayout(Layout):
    """Rank j of a node of ``ranks_per_node`` ranks reduces, votes on, applies and gathers chunk j."""

    def __init__(self, param_groups, plan, options, topology, vote_rule, stats, state, previous=None):
        largest: dict[tuple[torch.device, int], int] = {}  # (device, buffer) -> the largest bucket it carries
        for index, bucket in enumerate(plan.buckets):
            key = (bucket.device, index % IN_FLIGHT)
            largest[key] = max(largest.get(key, 0), bucket.padded_numel)
        self.node_grads = {key: torch.zeros(n, dtype=options.reduce_dtype, device=key[0])
                           for key, n in largest.items()}
        super().__init__(param_groups, plan, options, topology, vote_rule, stats, state, previous)

    def _node_grads_of(self, index: int, bucket: Bucket) -> Tensor:
        return self.node_grads[(bucket.device, index % IN_FLIGHT)][:bucket.padded_numel]

    def begin(self, grad_scale: Tensor | None) -> None:
        super().begin(grad_scale)
        for index in range(min(IN_FLIGHT, len(self.states))):
            self._reduce_start(index, grad_scale)

    def pack(self, index: int, step: int, grad_scale: Tensor | None) -> Tensor:
        self.node.reduce_finish(index)  # state.grads now holds the node's mean gradient
        flag = self._pack_chunk(self.states[index], step)
        if index + IN_FLIGHT < len(self.states):  # its staging buffer is free again
            self._reduce_start(index + IN_FLIGHT, grad_scale)
        return flag

    def apply(self, index: int, voted: Tensor, step: int, grad_scale: Tensor | None) -> None:
        state = self.states[index]
        self._apply_chunk(state, voted, step)
        self.node.gather_start(index, state.values)

    def end(self) -> None:
        self.node.gather_finish()
        super().end()

    def _reduce_start(self, index: int, grad_scale: Tensor | None) -> None:
        """Gather the bucket's local gradients into its staging buffer and launch the node's reduce-scatter."""
        state = self.states[index]
        self._gather_grads(state, grad_scale)
        self.node.reduce_start(index, state.node_grads, state.grads)
