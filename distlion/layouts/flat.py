"""Flat buckets: every rank is a voter, and the parameters are views of their bucket."""

from __future__ import annotations

from torch import Tensor

from distlion.kernels import kernels_for
from distlion.layouts.base import Layout


class FlatLayout(Layout):
    """Every rank votes on whole buckets (``ranks_per_node=1``); its gradients stay where they lie.

    The C kernels read ``p.grad`` in place and write the new momentum into the gradient
    buffer in the same pass (swapped in once the step is agreed).
    """

    def pack(self, index: int, step: int, grad_scale: Tensor | None) -> Tensor:
        state = self.states[index]
        if self.stale:
            return self._zero_signs(state)
        if self._momentum_in_pack(state) and grad_scale is None:
            beta1, beta2 = self._group(state)["betas"]
            return kernels_for(state.bucket.device).pack_grads_and_momentum(
                self.grads_of(state), state.gather_views, state.momentum, state.bits, state.grads, beta1=beta1,
                beta2=beta2, parity=step % 2)
        self._gather_grads(state, grad_scale)
        return self._pack_chunk(state, step)

    def apply(self, index: int, voted: Tensor, step: int, grad_scale: Tensor | None) -> None:
        self._apply_chunk(self.states[index], voted, step)
