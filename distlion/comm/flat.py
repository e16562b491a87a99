"""Flat collectives under the names of this torch version (torch 2.13 renamed them), and one way to wait.

``wait_for`` also keeps the handles of the last collectives it waited for, until the process ends.
A gloo work holds this rank's tensors, and a tensor that also has a Python object gives that object
back (a Py_DECREF, under the GIL) when a C++ owner lets go of it. Whoever drops the last reference to
a finished work does that: the caller's thread, or gloo's worker thread (``pt_gloo_runloop``), which
lets go of the work just after marking it complete, so it is the last owner whenever the caller
dropped its handle first. If the worker gets to it only after the interpreter began to shut down
(the work was the last of the job; the thread was descheduled or waited for the GIL), CPython ends
that thread with ``pthread_exit`` inside a noexcept destructor, and the process dies with
"terminate called without an active exception" (SIGABRT, exit -6) after a run that finished well.
Holding the handles here makes gloo's worker a non-last owner that only decrements a count; the
handles still held at exit are never released (see ``_keep_past_exit``), so no DistLion work is
destroyed on any thread during the teardown. The process group itself outlives the job anyway (torch
keeps references to it), so its threads run until the process ends.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import logging
import os
import sys
import time
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


# The handles of the last works waited for. Each of a gloo group's two threads holds a finished work
# only between marking it complete and taking its next one; a handle dropped here was waited for
# KEEP_FINISHED waits ago, long let go of by gloo. Few: a gloo reduce-scatter work holds a temporary
# of about its input's size until it is freed.
KEEP_FINISHED = 4
_finished: collections.deque = collections.deque(maxlen=KEEP_FINISHED)
# Seconds between two looks at a polled work's completion (``wait_for(poll=True)``).
POLL_S = 0.0002
# Seconds the interpreter gives up the GIL at exit, so that a gloo thread already waiting for it (to
# free a work some other code dropped, e.g. a last accelerator.gather) gets it before the teardown.
EXIT_GIL_YIELD_S = 0.02


@atexit.register
def _keep_past_exit() -> None:
    """Free none of the works held during the interpreter's teardown, and let gloo's threads finish first.

    atexit runs before the teardown starts. The reference added here is never dropped; the memory
    (views of DistLion's buffers) goes with the process.
    """
    if _finished:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(_finished))
        time.sleep(EXIT_GIL_YIELD_S)


class CollectiveError(RuntimeError):
    """A DistLion collective failed or timed out: the ranks no longer move together."""


_failed: list[CollectiveError] = []  # the CollectiveErrors raised in this process


@atexit.register
def _end_after_failure() -> None:
    """End a process that exits on an uncaught exception after a DistLion collective failed, at once.

    The timed-out gloo work still waits for a peer that will never send, and the
    interpreter's teardown would wait for it in turn (until the process group's own
    timeout, 30 minutes by default), so the launcher would never see this rank exit. The
    traceback is already printed; the output is flushed and the process ends with status 1.
    """
    if _failed and getattr(sys, "last_value", None) is not None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)


def wait_for(work: Any, what: str, timeout: timedelta | None, poll: bool = False) -> None:
    """Wait for ``work`` (an async collective); raise ``CollectiveError`` naming ``what`` and the likely causes.

    ``timeout`` None waits as long as the process group allows (its own timeout). ``poll``: watch
    ``is_completed()`` against the timeout instead of passing it to ``wait``, for works whose ``wait``
    ignores it (gloo's reduce-scatter waits for its peer whatever the timeout). The handle is kept
    (``_finished``), so gloo's worker thread never destroys it (see the module docstring).
    """
    try:
        if timeout is None:
            work.wait()
        elif poll:
            deadline = time.monotonic() + timeout.total_seconds()
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise RuntimeError("Operation timed out!")
                time.sleep(POLL_S)
            work.wait()  # raises the work's own error, if it failed
        else:
            work.wait(timeout)
    except RuntimeError as error:
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        _failed.append(CollectiveError(what))
        raise CollectiveError(
            f"DistLion: {what} failed or did not finish within {limit}: {error}. Likely causes: another rank "
            f"exited or crashed; the ranks took different numbers of steps (uneven data: give every rank the "
            f"same number of batches, e.g. DistributedSampler(drop_last=True)); or the ranks built DistLion "
            f"differently. Set DistLion(timeout=seconds) to bound the wait.") from error
    finally:
        _finished.append(work)  # pushes out the handle waited for KEEP_FINISHED waits ago


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
