"""DistLion's CPU kernels compiled from C: one pass over memory per kernel.

``cpu_native.c`` beside this file is built on first use with the system C compiler
(``cc -O3 -march=native``, about a second) into a per-user cache, keyed by the source,
the compiler, its flags and the CPU, and called through ctypes (which releases the GIL,
so large calls are split over ``torch.get_num_threads()`` threads). Implements the ops
of ``distlion.kernels.contract`` (plus the helpers ``pack_signs`` and ``nonfinite``),
bitwise equal to the reference backend.

Handled natively: fp32 gradients and momentum; fp32 parameters, or bf16 parameters with
fp32 master weights. Anything else (fp16, a bf16 momentum, a non-contiguous tensor) is
passed to ``torch_fast``, as is everything when no compiler is found.

Environment: ``DISTLION_CPU_KERNELS=torch`` skips the build and uses ``torch_fast``;
``DISTLION_CACHE_DIR`` moves the cache (default ``$XDG_CACHE_HOME/distlion`` or
``~/.cache/distlion``); ``CC`` names the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from distlion.kernels import torch_fast
from distlion.kernels.arithmetic import average_steps, bias_correction

logger = logging.getLogger("distlion")

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC"]
PARALLEL_MIN = 1 << 20  # coordinates below which one thread does the whole call
_ALIGN = 512  # thread ranges start at multiples of 512 coordinates (64 bytes of bits)

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "dl_pack_signs": ([_P, _P, _P, _P, _I64, _F32, _F32, _F32, _F32, _INT], _INT),
    "dl_pack_segments": ([_P, _P, _P, _INT, _P, _P, _P, _I64, _I64, _F32, _F32, _F32, _F32, _INT], _INT),
    "dl_update_momentum": ([_P, _P, _I64, _F32, _F32], None),
    "dl_nonfinite": ([_P, _I64], _INT),
    "dl_majority_vote": ([_P, _I64, _INT, _P, _I64, _INT], None),
    "dl_vote_counts": ([_P, _I64, _INT, _P, _I64, _INT, _I64], None),
    "dl_apply_majority": ([_P, _P, _P, _I64, _F32, _F32], None),
    "dl_apply_average": ([_P, _P, _P, _I64, _INT, _P, _I64, _F32, _F32], None),
    "dl_apply_scaled": ([_P, _P, _P, _P, _I64, _INT, _P, _I64, _F32, _F32, _F32, _F32, _F32], None),
}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def _cache_dir() -> Path:
    root = os.environ.get("DISTLION_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distlion"


def _cpu_model() -> str:
    """Name the CPU, so a cache shared by different machines never mixes -march=native builds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    """Compile the C source once per (source, compiler, flags, CPU) and return the library's path."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, platform.machine(),
                                    _cpu_model()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # ranks building at once never clash
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(built, target)
    return target


def library() -> ctypes.CDLL | None:
    """Return the compiled kernels, building them on first use; None when they cannot be had."""
    global _library, _load_tried
    with _lock:
        if _load_tried:
            return _library
        _load_tried = True
        if os.environ.get("DISTLION_CPU_KERNELS", "native") == "torch":
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            logger.warning("DistLion: no C compiler found (set CC), so the CPU kernels run on torch ops, "
                           "about 2x slower; install gcc to get the compiled kernels")
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("DistLion: building the C CPU kernels with %s failed, so they run on torch ops "
                           "(about 2x slower): %s", compiler, detail)
            return None
        for name, (argtypes, restype) in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = restype
        _library = lib
        return lib


def available() -> bool:
    """True when the compiled kernels are loaded (building them if needed)."""
    return library() is not None


def _native(*tensors: Tensor | None, dtypes: tuple = (torch.float32,)) -> bool:
    """True when every given tensor is a contiguous CPU tensor of one of ``dtypes``."""
    return library() is not None and all(
        t is None or (t.device.type == "cpu" and t.is_contiguous() and t.dtype in dtypes) for t in tensors)


def _split(numel: int, call: Callable[[int, int], object]) -> list:
    """Run ``call(lo, hi)`` over [0, numel) in aligned ranges, on the threads torch is allowed."""
    global _pool, _pool_threads
    threads = torch.get_num_threads()
    if threads <= 1 or numel < PARALLEL_MIN:
        return [call(0, numel)]
    step = -(-numel // threads // _ALIGN) * _ALIGN
    ranges = [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    with _lock:
        if _pool_threads < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="distlion-cpu")
            _pool_threads = threads
    return list(_pool.map(lambda r: call(*r), ranges))


def _address(tensor: Tensor, offset: int = 0) -> int:
    return tensor.data_ptr() + offset * tensor.element_size()


# ------------------------------------------------------- the ops of the contract

def pack_signs(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> None:
    _pack(grad, momentum, out, None, beta1=beta1, beta2=0.0, parity=parity)


def pack_signs_and_check(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> Tensor:
    return _pack(grad, momentum, out, None, beta1=beta1, beta2=0.0, parity=parity)


def pack_signs_and_momentum(grad: Tensor, momentum: Tensor, out: Tensor, momentum_out: Tensor, *, beta1: float,
                            beta2: float, parity: int) -> Tensor:
    return _pack(grad, momentum, out, momentum_out, beta1=beta1, beta2=beta2, parity=parity)


def pack_grads_and_momentum(grads: list[Tensor | None], views: list[Tensor], momentum: Tensor, out: Tensor,
                            momentum_out: Tensor, *, beta1: float, beta2: float, parity: int) -> Tensor:
    """Read the gradients where they are (no copy into the bucket), pack, check and write the new momentum."""
    if not (_native(momentum, momentum_out, *grads) and _native(out, dtypes=(torch.uint8,))):
        return torch_fast.pack_grads_and_momentum(grads, views, momentum, out, momentum_out, beta1=beta1,
                                                  beta2=beta2, parity=parity)
    lib = library()
    count = len(views)
    base = momentum_out.data_ptr()
    pointers = (ctypes.c_void_p * count)(*[None if g is None else g.data_ptr() for g in grads])
    starts = (ctypes.c_int64 * count)(*[(v.data_ptr() - base) // 4 for v in views])
    lengths = (ctypes.c_int64 * count)(*[v.numel() for v in views])
    found = _split(momentum.numel(), lambda lo, hi: lib.dl_pack_segments(
        pointers, starts, lengths, count, momentum.data_ptr(), out.data_ptr(), momentum_out.data_ptr(), lo, hi,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, parity))
    return torch.tensor(any(found))


def _pack(grad: Tensor, momentum: Tensor, out: Tensor, momentum_out: Tensor | None, *, beta1: float, beta2: float,
          parity: int) -> Tensor:
    """Pack signs in one pass, checking grad and (with ``momentum_out``) writing the new momentum."""
    if not _native(grad, momentum, momentum_out) or not _native(out, dtypes=(torch.uint8,)):
        if momentum_out is None:
            return torch_fast.pack_signs_and_check(grad, momentum, out, beta1=beta1, parity=parity)
        return torch_fast.pack_signs_and_momentum(grad, momentum, out, momentum_out, beta1=beta1, beta2=beta2,
                                                  parity=parity)
    lib = library()
    found = _split(grad.numel(), lambda lo, hi: lib.dl_pack_signs(
        _address(grad, lo), _address(momentum, lo), _address(out, lo // 8),
        None if momentum_out is None else _address(momentum_out, lo), hi - lo,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, parity))
    return torch.tensor(any(found))


def update_momentum(grad: Tensor, momentum: Tensor, *, beta2: float) -> None:
    if not _native(grad, momentum):
        return torch_fast.update_momentum(grad, momentum, beta2=beta2)
    lib = library()
    _split(grad.numel(), lambda lo, hi: lib.dl_update_momentum(
        _address(grad, lo), _address(momentum, lo), hi - lo, beta2, 1.0 - beta2))


def nonfinite(grad: Tensor) -> Tensor:
    if not _native(grad):
        return torch_fast.nonfinite(grad)
    lib = library()
    found = _split(grad.numel(), lambda lo, hi: lib.dl_nonfinite(_address(grad, lo), hi - lo))
    return torch.tensor(any(found))


def majority_vote(packed: Tensor, out: Tensor, *, casting_rank: int) -> None:
    if not _native(packed, out, dtypes=(torch.uint8,)):
        return torch_fast.majority_vote(packed, out, casting_rank=casting_rank)
    lib = library()
    rows, row_words = packed.shape[0], packed.shape[1] // 8
    _split(row_words * 64, lambda lo, hi: lib.dl_majority_vote(
        _address(packed, lo // 8), row_words, rows, _address(out, lo // 8), (hi - lo) // 64, casting_rank))


def vote_counts(packed: Tensor, out: Tensor) -> None:
    if not _native(packed, out, dtypes=(torch.uint8,)):
        return torch_fast.vote_counts(packed, out)
    lib = library()
    rows, row_words = packed.shape[0], packed.shape[1] // 8
    _split(row_words * 64, lambda lo, hi: lib.dl_vote_counts(
        _address(packed, lo // 8), row_words, rows, _address(out, lo // 8), row_words, out.shape[0],
        (hi - lo) // 64))


def _targets(param: Tensor, master: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """Return (fp32 tensor to update, bf16 tensor to round into) when C can apply, else None."""
    if master is None:
        return (param, None) if _native(param) else None
    if _native(master) and _native(param, dtypes=(torch.bfloat16,)):
        return master, param
    return None


def apply(param: Tensor, planes: Tensor, *, voters: int, lr: float, weight_decay: float,
          master: Tensor | None = None, vote_ema: Tensor | None = None, beta: float = 0.0, step: int = 1) -> None:
    targets = _targets(param, master)
    if targets is None or not _native(planes, dtypes=(torch.uint8,)) or planes.shape[0] > 30 \
            or (vote_ema is not None and not _native(vote_ema)):
        return torch_fast.apply(param, planes, voters=voters, lr=lr, weight_decay=weight_decay, master=master,
                                vote_ema=vote_ema, beta=beta, step=step)
    x, bf16 = targets
    bf16_at = (lambda lo: None) if bf16 is None else (lambda lo: _address(bf16, lo))
    lib = library()
    decay, neg_lr = 1.0 - lr * weight_decay, -lr
    if vote_ema is None and voters == 1 and planes.shape[0] == 1:  # a majority vote: -1/+1 by a blend, no table
        _split(x.numel(), lambda lo, hi: lib.dl_apply_majority(
            _address(x, lo), bf16_at(lo), _address(planes, lo // 8), hi - lo, decay, neg_lr))
        return
    steps = _step_table(voters, planes.shape[0])
    if vote_ema is None:
        _split(x.numel(), lambda lo, hi: lib.dl_apply_average(
            _address(x, lo), bf16_at(lo), _address(planes, lo // 8), planes.shape[1], planes.shape[0],
            steps.data_ptr(), hi - lo, decay, neg_lr))
        return
    correction = bias_correction(beta, step)
    _split(x.numel(), lambda lo, hi: lib.dl_apply_scaled(
        _address(x, lo), bf16_at(lo), _address(vote_ema, lo), _address(planes, lo // 8), planes.shape[1],
        planes.shape[0], steps.data_ptr(), hi - lo, beta, 1.0 - beta, correction, decay, neg_lr))


def _step_table(voters: int, planes: int) -> Tensor:
    """fp32 step for every count the planes can spell (counts above N never come from a vote)."""
    steps = torch.zeros(1 << planes, dtype=torch.float32)
    steps[:voters + 1] = average_steps(voters)
    return steps

