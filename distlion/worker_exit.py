"""End a worker process once its work is done and its results are written.

A finished job no longer needs this: a script that returns normally exits 0. The abort it
was written against ("terminate called without an active exception", exit status -6, now
and then after a run that finished well) came from gloo's worker thread (``pt_gloo_runloop``)
freeing the last finished work of the job after the interpreter had begun its teardown:
the work's tensors have Python objects, giving one back takes the GIL, and CPython ends a
thread that asks for the GIL during the teardown with ``pthread_exit`` inside a noexcept
destructor. DistLion's collectives keep their handles, so that thread never frees one
(distlion/comm/flat.py); ``python -m benchmarks.clean_exit`` counts exit codes of real launches.
The process group outliving ``destroy_process_group()`` (torch keeps references to it once
``torch._dynamo`` is imported) leaves its threads running, which is harmless by itself.

``exit_worker`` remains for scripts whose own last collectives (not DistLion's) could meet
the same race, and for ending a worker without the interpreter's teardown: it destroys the
group if it is still up, flushes the output, and ends the process with ``os._exit``. Call it
last, from a script's entry point, and only after a success: on an error let the exception
propagate, so the traceback and the exit status reach the launcher as usual.
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
