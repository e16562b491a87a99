"""FSDP2's local shards: each rank updates and votes on the shards it holds, staged piece by piece.

Under ``fully_shard(module, mesh=mesh["shard"])`` FSDP owns the shards' storage and the
gradients (already the node's mean, from its reduce-scatter), so DistLion keeps no bucket
copy of either (``distlion.local_shards.ShardStaging``): packing gathers a piece of the
gradients into scratch, and applying gathers it again (for the momentum), copies the
piece's values in, updates them and copies them back. The momentum is therefore updated
at apply, once every rank agreed to take the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distlion.buckets import slot_views
from distlion.kernels import kernels_for
from distlion.layouts.base import Layout
from distlion.local_shards import ShardStaging, copy_shards, local_tensor


class ShardLayout(Layout):
    """Every parameter is a contiguous FSDP2 shard: buckets of pieces, no ``values`` or ``grads`` copies."""

    staged = True

    def __init__(self, param_groups, plan, options, topology, vote_rule, stats, state, previous=None):
        params = [p for group in param_groups for p in group["params"]]
        self.staging = ShardStaging(plan.buckets, [[local_tensor(params[slot.param_index]) for slot in bucket.slots]
                                                   for bucket in plan.buckets])
        super().__init__(param_groups, plan, options, topology, vote_rule, stats, state, previous)

    def pack(self, index: int, step: int, grad_scale: Tensor | None) -> Tensor:
        state = self.states[index]
        if self.stale:
            return self._zero_signs(state)
        kernels = kernels_for(state.bucket.device)
        beta1 = self._group(state)["betas"][0]
        grads = self.grads_of(state)
        flag = None
        for piece in self.staging.pieces[index]:
            piece_grads = self.staging.gather(index, piece, grads, state.bucket, grad_scale)
            nonfinite = kernels.pack_signs_and_check(piece_grads, state.momentum[piece.lo:piece.hi],
                                                     state.bits[piece.lo // 8:piece.hi // 8], beta1=beta1,
                                                     parity=step % 2)
            flag = nonfinite if flag is None else flag | nonfinite
        return flag

    def apply(self, index: int, voted: Tensor, step: int, grad_scale: Tensor | None) -> None:
        state = self.states[index]
        kernels = kernels_for(state.bucket.device)
        group = self._group(state)
        grads = self.grads_of(state)
        for piece in self.staging.pieces[index]:
            lo, hi = piece.lo, piece.hi
            kernels.update_momentum(self.staging.gather(index, piece, grads, state.bucket, grad_scale),
                                    state.momentum[lo:hi], beta2=group["betas"][1])
            values = self.staging.load(index, piece, state.bucket)
            self.vote_rule.apply(values, voted[:, lo // 8:hi // 8].contiguous(), lr=group["lr"],
                                 weight_decay=group["weight_decay"],
                                 master=None if state.master is None else state.master[lo:hi],
                                 vote_ema=None if state.vote_ema is None else state.vote_ema[lo:hi],
                                 beta=group["vote_ema_beta"], step=step)
            self.staging.store(index, piece, values)

    def _whole_values(self, index: int) -> Tensor:
        bucket = self.buckets[index]
        values = torch.zeros(bucket.padded_numel, dtype=bucket.dtype, device=bucket.device)
        copy_shards([view.view(-1) for view in slot_views(values, bucket)], self.staging.shards[index])
        return values

    def _store_whole_values(self, index: int, values: Tensor) -> None:
        copy_shards(self.staging.shards[index], [view.view(-1) for view in slot_views(values, self.buckets[index])])
