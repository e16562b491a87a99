"""Run a function on N real processes (gloo by default) and collect what each rank returns.

Every launch is bounded by a timeout: a hang fails the test instead of stalling CI.
Workers are module-level functions ``fn(rank, world_size, *args)``; what they return
(tensors, numbers, strings) comes back as a list indexed by rank. An exception in any
rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120.0


def _to_bytes(value) -> bytes:
    # Plain bytes, not shared-memory tensors: the worker may exit before they are read.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, init_file: str, backend: str, fn, args, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        outcome = (rank, "ok", _to_bytes(fn(rank, world_size, *args)))
    except BaseException:  # report every failure, including KeyboardInterrupt from a kill
        outcome = (rank, "error", traceback.format_exc())
    # Reported before the teardown, which waits for every peer's pending work: a stopped peer never ends it.
    results.put(outcome)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    ``backend`` is gloo unless a test asks for NCCL (one GPU per rank; world size 1 with one GPU).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, backend, fn, args, results), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outputs: dict[int, object] = {}
        errors: dict[int, str] = {}
        try:
            for _ in range(world_size):
                rank, status, value = results.get(timeout=timeout)
                if status == "ok":
                    outputs[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors[rank] = value
                if errors:
                    break
        except queue.Empty:
            missing = sorted(set(range(world_size)) - set(outputs) - set(errors))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (hang?)") from None
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
        if errors:
            rank = min(errors)
            raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
        return [outputs[r] for r in range(world_size)]
