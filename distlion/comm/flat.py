"""Flat collectives under the names of this torch version (torch 2.13 renamed them), and one way to wait."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def flag_device(group: Any) -> torch.device:
    """Where a small tensor for a collective of ``group`` must live: NCCL moves CUDA tensors only, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CollectiveError(RuntimeError):
    """A DistLion collective failed or timed out: the ranks no longer move together."""


def wait_for(work: Any, what: str, timeout: timedelta | None) -> None:
    """Wait for ``work`` (an async collective); raise ``CollectiveError`` naming ``what`` and the likely causes.

    ``timeout`` None waits as long as the process group allows (its own timeout).
    """
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as error:
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        raise CollectiveError(
            f"DistLion: {what} failed or did not finish within {limit}: {error}. Likely causes: another rank "
            f"exited or crashed; the ranks took different numbers of steps (uneven data: give every rank the "
            f"same number of batches, e.g. DistributedSampler(drop_last=True)); or the ranks built DistLion "
            f"differently. Set DistLion(timeout=seconds) to bound the wait.") from error


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
