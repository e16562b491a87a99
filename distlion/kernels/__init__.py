"""Pure tensor kernels of DistLion: local step + pack, vote, unpack + apply.

No process group is involved here; every function works on flat bucket tensors. The
ops and their arithmetic are declared once, in ``distlion.kernels.contract``; each
backend in ``BACKENDS`` implements all of them, and ``kernels_for(device)`` picks one:

- ``reference``: plain and obvious, the oracle of the tests (nothing else imports it);
- ``torch_fast``: chunked torch ops on packed int64 words, for any device;
- ``cpu_native``: C compiled on first use, one pass per kernel, the default on CPU
  (it hands what it does not cover, and everything when no C compiler is found, to
  ``torch_fast``);
- ``triton_kernels``: fused Triton kernels, the default for CUDA tensors when Triton
  is installed.

Formulas the backends share (the average vote's steps, the scaled step) live in
``distlion.kernels.arithmetic``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from distlion.kernels import contract

__all__ = ["BACKENDS", "backend", "kernels_for"]

BACKENDS = ("reference", "torch_fast", "cpu_native", "triton_kernels")


@functools.cache
def backend(name: str) -> ModuleType:
    """Import the backend ``name`` (one of ``BACKENDS``), checked against the contract.

    Raises ImportError when its dependencies are missing (Triton) and TypeError when it
    lacks an op of ``distlion.kernels.contract`` or declares one with other parameters.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    return contract.check_backend(importlib.import_module(f"distlion.kernels.{name}"))


def kernels_for(device: torch.device | str) -> ModuleType:
    """Return the fastest kernel backend for tensors on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            return backend("triton_kernels")
        except ImportError:  # Triton missing or unusable: torch ops work on any device
            return backend("torch_fast")
    if kind == "cpu" and backend("cpu_native").available():
        return backend("cpu_native")
    return backend("torch_fast")
