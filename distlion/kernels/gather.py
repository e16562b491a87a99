"""Gather per-parameter gradients into a flat bucket buffer, the step before packing."""

from __future__ import annotations

from typing import Callable

import torch

from torch import Tensor


def gather_into(grads: list[Tensor | None], views: list[Tensor]) -> None:
    """Copy each gradient into its view of the flat buffer; a missing gradient (None) is zero."""
    present = [(view, grad) for grad, view in zip(grads, views) if grad is not None]
    missing = [view for grad, view in zip(grads, views) if grad is None]
    if present:
        torch._foreach_copy_([view for view, _ in present], [grad for _, grad in present])
    if missing:
        torch._foreach_zero_(missing)


def pack_after_gather(pack_signs_and_momentum: Callable[..., Tensor], grads: list[Tensor | None],
                      views: list[Tensor], momentum: Tensor, out: Tensor, momentum_out: Tensor, *, beta1: float,
                      beta2: float, parity: int) -> Tensor:
    """``pack_grads_and_momentum`` for kernels that need the gradient flat: gather, then pack.

    ``views`` are of ``momentum_out``: it holds the gradient, then the new momentum.
    """
    gather_into(grads, views)
    return pack_signs_and_momentum(momentum_out, momentum, out, momentum_out, beta1=beta1, beta2=beta2,
                                   parity=parity)
