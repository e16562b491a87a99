"""Flat collectives under the names of this torch version (torch 2.13 renamed them)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def all_gather_flat(output: Tensor, input: Tensor, group, async_op: bool = False):
    """Gather every rank's ``input`` into ``output`` (contiguous, rank-major), flat; the work handle if async.

    ``input`` may be rank r's own slice of ``output`` (in place).
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output.view(-1), input.view(-1), group=group, async_op=async_op)


def reduce_scatter_flat(output: Tensor, input: Tensor, group, async_op: bool = False):
    """Sum every rank's ``input`` and give rank r slice r of the sum in ``output``; the work handle if async."""
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return reduce_scatter(output.view(-1), input.view(-1), group=group, async_op=async_op)
