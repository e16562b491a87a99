"""Gather per-parameter gradients into a flat bucket buffer, the step before packing."""

from __future__ import annotations

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
