"""End a worker process once its work is done and its results are written.

A gloo process group can outlive ``destroy_process_group()``. torch keeps a reference
to the group when ``torch._dynamo`` is first imported after the group exists (building
any ``torch.optim`` optimizer imports it, and DDP does), and Accelerate's optimizer
wrappers keep theirs in reference cycles. The group's worker threads (``pt_gloo_runloop``,
``gloo_tcp_loop``) then are still running when the interpreter shuts down, and that
teardown now and then aborts a run that finished well: "terminate called without an
active exception", exit status -6, so the launcher reports a failure.

``exit_worker`` destroys the group if it is still up, flushes the output, and ends the
process without the interpreter's teardown. Call it last, from a script's entry point,
and only after a success: on an error let the exception propagate, so the traceback
and the exit status reach the launcher as usual.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def exit_worker(code: int = 0) -> NoReturn:
    """Destroy the process group, flush stdout, stderr and logging, and exit with ``code``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
