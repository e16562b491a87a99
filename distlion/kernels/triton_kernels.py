"""Fused Triton kernels for CUDA tensors, bitwise equal to the reference backend.

Implements the ops of ``distlion.kernels.contract`` (plus the helpers ``pack_signs`` and
``nonfinite``), each in one pass over its inputs:

- the pack ops read grad and momentum once and write the packed sign bytes (and the
  new momentum, and the non-finite flag);
- ``majority_vote`` / ``vote_counts`` add N packed rows with a bit-sliced adder on
  32-bit words (32 coordinates per lane), never unpacking a row;
- ``apply`` unpacks the vote inside the update of the fp32 master (or the parameter)
  and writes the rounded parameter in the same pass; one kernel whose constexpr flags
  choose the step direction (a majority's -1/+1, the average's (2k - N) / N, and the
  scaled step's EMA).

Bitwise equality with torch rests on three choices:

- every scalar is rounded to fp32 on the host the way torch rounds a Python scalar
  (computed in double, then rounded once), and torch's ``a.add(b, alpha=k)`` is
  written as ``tl.fma(b, k, a)``, which is what torch's CPU (AVX2) and CUDA kernels
  compute;
- bfloat16 is converted with integer bit operations (round to nearest even, as
  ``c10::BFloat16``) instead of ``.to(tl.bfloat16)``: the Triton interpreter
  truncates or rounds half away from zero, the GPU rounds to nearest even, and the
  bit form is the same everywhere;
- the average divides with ``tl.div_rn`` (IEEE division; a plain ``/`` is
  approximate on NVIDIA GPUs).

The module imports without a GPU and launches nothing at import. Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors; blocks are then larger,
because each program of the interpreter is one round of numpy calls.
"""

from __future__ import annotations

import os
import struct
from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from distlion.kernels.arithmetic import bias_correction
from distlion.kernels.contract import OPS
from distlion.kernels.gather import pack_after_gather

__all__ = [*OPS, "pack_signs", "nonfinite"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Block sizes are read at call time, so tests may shrink them to cover many programs
# and ragged tails with small tensors.
BLOCK = 1 << 16 if _INTERPRET else 4096        # coordinates per program, elementwise kernels
VOTE_BLOCK = 1 << 14 if _INTERPRET else 512    # packed words per program, vote kernels
NUM_WARPS = 8                                  # ignored by the interpreter
VOTE_WARPS = 8                                 # 512 words x 8 warps: best of a sweep on an H100
MAX_PLANES = 16                                # the vote kernels count up to 2**16 - 1 rows

_BF16 = torch.bfloat16


def _f32(value: float) -> float:
    """Return ``value`` rounded once to the nearest fp32, as torch rounds a Python scalar."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _bits_view(tensor: Tensor) -> Tensor:
    """View bfloat16 as int16 (the kernels convert it bitwise); pass other dtypes through."""
    return tensor.view(torch.int16) if tensor.dtype == _BF16 else tensor


def _check_flat(name: str, tensor: Tensor, numel: int) -> None:
    """Raise if ``tensor`` is not a contiguous float tensor of ``numel`` elements."""
    if tensor.numel() != numel or not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous with {numel} elements, got shape "
                         f"{tuple(tensor.shape)} (contiguous={tensor.is_contiguous()})")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {tensor.dtype}")


def _check_bytes(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    """Raise if ``tensor`` is not a contiguous uint8 tensor of ``shape`` elements."""
    numel = 1
    for size in shape:
        numel *= size
    if tensor.dtype != torch.uint8 or tensor.numel() != numel or not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous uint8 with shape {shape}, got {tensor.dtype} "
                         f"{tuple(tensor.shape)} (contiguous={tensor.is_contiguous()})")


def _check_numel(numel: int) -> None:
    """Raise unless ``numel`` is a whole number of packed bytes."""
    if numel % 8:
        raise ValueError(f"bucket size must be a multiple of 8 coordinates, got {numel}")


def _words(*tensors: Tensor) -> list[Tensor]:
    """View packed bytes as int32 words (4x fewer lanes) when every tensor allows it, else keep bytes."""
    if all(t.shape[-1] % 4 == 0 and t.storage_offset() % 4 == 0 for t in tensors):
        return [t.view(torch.int32) for t in tensors]
    return list(tensors)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Load elements as fp32; bfloat16 arrives as int16 bits and widens exactly."""
    raw = tl.load(ptr + offs, mask=mask, other=0)
    if IS_BF16:
        bits = (raw.to(tl.int32) & 0xFFFF) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _store_f32(ptr, offs, x, mask, IS_BF16: tl.constexpr):
    """Store fp32 ``x`` in the pointer's dtype, rounding to nearest even."""
    if IS_BF16:
        bits = x.to(tl.int32, bitcast=True)
        # c10::BFloat16 rounding: add 0x7FFF plus the lowest kept bit, keep the top half.
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, -1, rounded)  # NaN -> 0xFFFF, as torch's CPU conversion writes it
        tl.store(ptr + offs, rounded.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(BYTES: tl.constexpr):
    """Return (byte index [BYTES], bit index [8]) of this program's [BYTES, 8] tile."""
    first = tl.program_id(0).to(tl.int64) * BYTES
    return first + tl.arange(0, BYTES), tl.arange(0, 8)


# ----------------------------------------------------------------- local step + pack


@triton.jit
def _pack_signs_kernel(grad_ptr, mom_ptr, out_ptr, flag_ptr, mom_out_ptr, n_bytes, beta1, one_minus_beta1,
                       beta2, one_minus_beta2, parity, G_BF16: tl.constexpr, M_BF16: tl.constexpr,
                       CHECK: tl.constexpr, WRITE_MOMENTUM: tl.constexpr, BYTES: tl.constexpr):
    byte, bit = _tile(BYTES)
    offs = byte[:, None] * 8 + bit[None, :]
    in_bounds = byte < n_bytes
    mask = in_bounds[:, None]
    g = _load_f32(grad_ptr, offs, mask, G_BF16)
    m = _load_f32(mom_ptr, offs, mask, M_BF16)
    c = tl.fma(g, one_minus_beta1, m * beta1)  # torch: (m * b1).add(g, alpha=1 - b1)
    # Zero rule: + where (8*byte + bit + parity) is even, i.e. where (bit + parity) is even.
    zero_positive = ((bit + parity) & 1) == 0
    positive = (c > 0) | ((c == 0) & zero_positive[None, :])
    # Distinct powers of two: their sum is their bitwise or.
    packed = tl.sum(positive.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=in_bounds)
    if WRITE_MOMENTUM:  # same rounding as _update_momentum_kernel; mom_out may alias grad
        _store_f32(mom_out_ptr, offs, tl.fma(g, one_minus_beta2, m * beta2), mask, M_BF16)
    if CHECK:  # inf and nan survive the widening to fp32; every program seeing one stores the same 1
        bad = ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
        tl.store(flag_ptr, 1, mask=tl.max(tl.max(bad, axis=1), axis=0) > 0)


def pack_signs(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> None:
    """Write the packed signs of beta1*momentum + (1-beta1)*grad into ``out``."""
    _pack(grad, momentum, out, None, None, beta1=beta1, beta2=0.0, parity=parity)


def pack_signs_and_check(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> Tensor:
    """``pack_signs`` that also returns ``nonfinite(grad)``, checked in the same pass (on the device)."""
    flag = torch.zeros((), dtype=torch.uint8, device=grad.device)
    _pack(grad, momentum, out, flag, None, beta1=beta1, beta2=0.0, parity=parity)
    return flag.view(torch.bool)


def pack_signs_and_momentum(grad: Tensor, momentum: Tensor, out: Tensor, momentum_out: Tensor, *, beta1: float,
                            beta2: float, parity: int) -> Tensor:
    """``pack_signs_and_check`` that also writes the new momentum to ``momentum_out`` (may be ``grad``)."""
    if momentum_out.dtype != momentum.dtype:
        raise ValueError(f"momentum_out must have momentum's dtype {momentum.dtype}, got {momentum_out.dtype}")
    _check_flat("momentum_out", momentum_out, grad.numel())
    flag = torch.zeros((), dtype=torch.uint8, device=grad.device)
    _pack(grad, momentum, out, flag, momentum_out, beta1=beta1, beta2=beta2, parity=parity)
    return flag.view(torch.bool)


def _pack(grad: Tensor, momentum: Tensor, out: Tensor, flag: Tensor | None, momentum_out: Tensor | None, *,
          beta1: float, beta2: float, parity: int) -> None:
    numel = grad.numel()
    _check_numel(numel)
    _check_flat("grad", grad, numel)
    _check_flat("momentum", momentum, numel)
    _check_bytes("out", out, (numel // 8,))
    if numel == 0:
        return
    bytes_per_program = BLOCK // 8
    grid = (triton.cdiv(numel // 8, bytes_per_program),)
    _pack_signs_kernel[grid](
        _bits_view(grad), _bits_view(momentum), out, out if flag is None else flag,
        _bits_view(momentum if momentum_out is None else momentum_out), numel // 8,
        _f32(beta1), _f32(1.0 - beta1), _f32(beta2), _f32(1.0 - beta2), int(parity) % 2,
        G_BF16=grad.dtype == _BF16, M_BF16=momentum.dtype == _BF16, CHECK=flag is not None,
        WRITE_MOMENTUM=momentum_out is not None, BYTES=bytes_per_program, num_warps=NUM_WARPS,
        enable_fp_fusion=False)


pack_grads_and_momentum = partial(pack_after_gather, pack_signs_and_momentum)


@triton.jit
def _update_momentum_kernel(grad_ptr, mom_ptr, numel, beta2, one_minus_beta2,
                            G_BF16: tl.constexpr, M_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    g = _load_f32(grad_ptr, offs, mask, G_BF16)
    m = _load_f32(mom_ptr, offs, mask, M_BF16)
    _store_f32(mom_ptr, offs, tl.fma(g, one_minus_beta2, m * beta2), mask, M_BF16)


def update_momentum(grad: Tensor, momentum: Tensor, *, beta2: float) -> None:
    """Set momentum <- beta2*momentum + (1-beta2)*grad in place, in momentum's dtype."""
    numel = grad.numel()
    _check_flat("grad", grad, numel)
    _check_flat("momentum", momentum, numel)
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    _update_momentum_kernel[grid](
        _bits_view(grad), _bits_view(momentum), numel, _f32(beta2), _f32(1.0 - beta2),
        G_BF16=grad.dtype == _BF16, M_BF16=momentum.dtype == _BF16,
        BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


# Exponent bits of each float dtype, and the integer dtype its bits are read as:
# a value is inf or nan exactly when all its exponent bits are set.
_EXPONENT = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


@triton.jit
def _nonfinite_kernel(bits_ptr, flag_ptr, numel, EXPONENT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    bits = tl.load(bits_ptr + offs, mask=offs < numel, other=0)
    bad = ((bits & EXPONENT) == EXPONENT).to(tl.int32)
    # Every program that sees a bad value stores the same 1: the race is benign.
    tl.store(flag_ptr, 1, mask=tl.max(bad, axis=0) > 0)


def nonfinite(grad: Tensor) -> Tensor:
    """Return a 0-dim bool tensor on grad's device, True if grad holds an inf or nan."""
    if grad.dtype not in _EXPONENT:
        raise ValueError(f"grad must be fp32, bf16, fp16 or fp64, got {grad.dtype}")
    if not grad.is_contiguous():
        raise ValueError(f"grad must be contiguous, got strides {grad.stride()}")
    flag = torch.zeros((), dtype=torch.uint8, device=grad.device)
    numel = grad.numel()
    if numel:
        int_dtype, exponent = _EXPONENT[grad.dtype]
        grid = (triton.cdiv(numel, BLOCK),)
        _nonfinite_kernel[grid](grad.view(int_dtype), flag, numel, EXPONENT=exponent,
                                BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return flag.view(torch.bool)


# ------------------------------------------------------------------------------ vote


@triton.jit
def _half_add(plane, carry):
    """Add a carry bit-slice into one count plane: return (sum, carry out)."""
    return plane ^ carry, plane & carry


@triton.jit
def _bit_sliced_count(ptrs, row_stride, mask, zero, N: tl.constexpr, P: tl.constexpr):
    """Add N packed rows lane by lane; plane i holds bit i of each coordinate's count.

    Only the first P planes are touched (count <= N < 2**P); the rest stay zero.
    """
    p0 = zero
    p1 = zero
    p2 = zero
    p3 = zero
    p4 = zero
    p5 = zero
    p6 = zero
    p7 = zero
    p8 = zero
    p9 = zero
    p10 = zero
    p11 = zero
    p12 = zero
    p13 = zero
    p14 = zero
    p15 = zero
    for row in range(N):
        carry = tl.load(ptrs, mask=mask, other=0)
        ptrs += row_stride  # pointer steps are 64-bit: no int32 overflow on N * C
        p0, carry = _half_add(p0, carry)
        if P > 1:
            p1, carry = _half_add(p1, carry)
        if P > 2:
            p2, carry = _half_add(p2, carry)
        if P > 3:
            p3, carry = _half_add(p3, carry)
        if P > 4:
            p4, carry = _half_add(p4, carry)
        if P > 5:
            p5, carry = _half_add(p5, carry)
        if P > 6:
            p6, carry = _half_add(p6, carry)
        if P > 7:
            p7, carry = _half_add(p7, carry)
        if P > 8:
            p8, carry = _half_add(p8, carry)
        if P > 9:
            p9, carry = _half_add(p9, carry)
        if P > 10:
            p10, carry = _half_add(p10, carry)
        if P > 11:
            p11, carry = _half_add(p11, carry)
        if P > 12:
            p12, carry = _half_add(p12, carry)
        if P > 13:
            p13, carry = _half_add(p13, carry)
        if P > 14:
            p14, carry = _half_add(p14, carry)
        if P > 15:
            p15, carry = _half_add(p15, carry)
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15


@triton.jit
def _compare_step(greater, equal, plane, BIT: tl.constexpr):
    """Fold one plane, MSB first, into (count > constant, count == constant)."""
    if BIT:
        equal = equal & plane
    else:
        greater = greater | (equal & plane)
        equal = equal & ~plane
    return greater, equal


@triton.jit
def _count_block(packed_ptr, out_ptr, n_words, N: tl.constexpr, P: tl.constexpr, BW: tl.constexpr):
    """This program's BW words: offsets, mask, a zero word (out's dtype) and the count planes p0..p15."""
    offs = tl.program_id(0) * BW + tl.arange(0, BW)
    mask = offs < n_words
    zero = tl.zeros([BW], dtype=out_ptr.dtype.element_ty)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = _bit_sliced_count(
        packed_ptr + offs, n_words, mask, zero, N, P)
    return offs, mask, zero, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15


@triton.jit
def _majority_kernel(packed_ptr, casting_ptr, out_ptr, n_words,
                     N: tl.constexpr, P: tl.constexpr, HALF: tl.constexpr, BW: tl.constexpr):
    offs, mask, zero, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = _count_block(
        packed_ptr, out_ptr, n_words, N, P, BW)
    greater = zero
    equal = ~zero
    # Planes at or above P are zero and so are HALF's bits there: skip them.
    if P > 15:
        greater, equal = _compare_step(greater, equal, p15, (HALF >> 15) & 1)
    if P > 14:
        greater, equal = _compare_step(greater, equal, p14, (HALF >> 14) & 1)
    if P > 13:
        greater, equal = _compare_step(greater, equal, p13, (HALF >> 13) & 1)
    if P > 12:
        greater, equal = _compare_step(greater, equal, p12, (HALF >> 12) & 1)
    if P > 11:
        greater, equal = _compare_step(greater, equal, p11, (HALF >> 11) & 1)
    if P > 10:
        greater, equal = _compare_step(greater, equal, p10, (HALF >> 10) & 1)
    if P > 9:
        greater, equal = _compare_step(greater, equal, p9, (HALF >> 9) & 1)
    if P > 8:
        greater, equal = _compare_step(greater, equal, p8, (HALF >> 8) & 1)
    if P > 7:
        greater, equal = _compare_step(greater, equal, p7, (HALF >> 7) & 1)
    if P > 6:
        greater, equal = _compare_step(greater, equal, p6, (HALF >> 6) & 1)
    if P > 5:
        greater, equal = _compare_step(greater, equal, p5, (HALF >> 5) & 1)
    if P > 4:
        greater, equal = _compare_step(greater, equal, p4, (HALF >> 4) & 1)
    if P > 3:
        greater, equal = _compare_step(greater, equal, p3, (HALF >> 3) & 1)
    if P > 2:
        greater, equal = _compare_step(greater, equal, p2, (HALF >> 2) & 1)
    if P > 1:
        greater, equal = _compare_step(greater, equal, p1, (HALF >> 1) & 1)
    greater, equal = _compare_step(greater, equal, p0, HALF & 1)
    if N % 2 == 0:  # a tie (count == N/2) takes the casting rank's bit
        casting = tl.load(casting_ptr + offs, mask=mask, other=0)
        greater = greater | (equal & casting)
    tl.store(out_ptr + offs, greater, mask=mask)


def _check_rows(packed: Tensor) -> tuple[int, int]:
    """Return (N, C) of a packed [N, C] uint8 tensor, or raise naming what is wrong."""
    if packed.dim() != 2:
        raise ValueError(f"packed must be [N, C], got shape {tuple(packed.shape)}")
    rows, cols = packed.shape
    _check_bytes("packed", packed, (rows, cols))
    if not 1 <= rows < 1 << MAX_PLANES:
        raise ValueError(f"packed must have 1 to {(1 << MAX_PLANES) - 1} rows, got {rows}")
    return rows, cols


def majority_vote(packed: Tensor, out: Tensor, *, casting_rank: int) -> None:
    """Write the bitwise majority of the N rows of ``packed`` into ``out``; ties take row ``casting_rank``."""
    rows, cols = _check_rows(packed)
    _check_bytes("out", out, (cols,))
    if not 0 <= casting_rank < rows:
        raise ValueError(f"casting_rank must be in [0, {rows}), got {casting_rank}")
    if cols == 0:
        return
    words, out_words = _words(packed, out.view(-1))
    n_words = words.shape[1]
    grid = (triton.cdiv(n_words, VOTE_BLOCK),)
    _majority_kernel[grid](
        words, words[casting_rank], out_words, n_words,
        N=rows, P=rows.bit_length(), HALF=rows // 2, BW=VOTE_BLOCK, num_warps=VOTE_WARPS, enable_fp_fusion=False)


@triton.jit
def _vote_counts_kernel(packed_ptr, out_ptr, n_words,
                        N: tl.constexpr, P: tl.constexpr, B: tl.constexpr, BW: tl.constexpr):
    offs, mask, zero, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = _count_block(
        packed_ptr, out_ptr, n_words, N, P, BW)
    ptrs = out_ptr + offs
    # Planes at or above P are still zero, which is what those output planes must hold.
    # Each store steps the pointer by one plane (64-bit pointer arithmetic, no int32 product).
    tl.store(ptrs, p0, mask=mask)
    if B > 1:
        ptrs += n_words
        tl.store(ptrs, p1, mask=mask)
    if B > 2:
        ptrs += n_words
        tl.store(ptrs, p2, mask=mask)
    if B > 3:
        ptrs += n_words
        tl.store(ptrs, p3, mask=mask)
    if B > 4:
        ptrs += n_words
        tl.store(ptrs, p4, mask=mask)
    if B > 5:
        ptrs += n_words
        tl.store(ptrs, p5, mask=mask)
    if B > 6:
        ptrs += n_words
        tl.store(ptrs, p6, mask=mask)
    if B > 7:
        ptrs += n_words
        tl.store(ptrs, p7, mask=mask)
    if B > 8:
        ptrs += n_words
        tl.store(ptrs, p8, mask=mask)
    if B > 9:
        ptrs += n_words
        tl.store(ptrs, p9, mask=mask)
    if B > 10:
        ptrs += n_words
        tl.store(ptrs, p10, mask=mask)
    if B > 11:
        ptrs += n_words
        tl.store(ptrs, p11, mask=mask)
    if B > 12:
        ptrs += n_words
        tl.store(ptrs, p12, mask=mask)
    if B > 13:
        ptrs += n_words
        tl.store(ptrs, p13, mask=mask)
    if B > 14:
        ptrs += n_words
        tl.store(ptrs, p14, mask=mask)
    if B > 15:
        ptrs += n_words
        tl.store(ptrs, p15, mask=mask)


def vote_counts(packed: Tensor, out: Tensor) -> None:
    """Write the per-coordinate count of set bits of ``packed`` into the bit planes of ``out``."""
    rows, cols = _check_rows(packed)
    if out.dim() != 2:
        raise ValueError(f"out must be [B, C], got shape {tuple(out.shape)}")
    planes = out.shape[0]
    _check_bytes("out", out, (planes, cols))
    if planes < rows.bit_length():
        raise ValueError(f"out needs at least {rows.bit_length()} planes for {rows} rows, got {planes}")
    if cols == 0:
        return
    kernel_planes = min(planes, MAX_PLANES)
    if planes > kernel_planes:  # counts never reach these planes
        out[kernel_planes:].zero_()
    words, out_words = _words(packed, out)
    n_words = words.shape[1]
    grid = (triton.cdiv(n_words, VOTE_BLOCK),)
    _vote_counts_kernel[grid](
        words, out_words, n_words,
        N=rows, P=rows.bit_length(), B=kernel_planes, BW=VOTE_BLOCK, num_warps=VOTE_WARPS, enable_fp_fusion=False)


# ----------------------------------------------------------------- unpack + apply


@triton.jit
def _average_step(counts_ptr, byte, bit, in_bounds, n_bytes, voters, B: tl.constexpr, BYTES: tl.constexpr):
    """The average vote's step (2*count - N) / N of a [BYTES, 8] tile, count from B bit-planes."""
    count = tl.zeros([BYTES, 8], dtype=tl.int32)
    plane_ptrs = counts_ptr + byte
    for i in tl.static_range(B):
        plane = tl.load(plane_ptrs, mask=in_bounds, other=0).to(tl.int32)
        count += ((plane[:, None] >> bit[None, :]) & 1) << i
        plane_ptrs += n_bytes
    # torch: (2*count - N).float() / N, an IEEE fp32 division; the numerator is exact.
    return tl.div_rn((2 * count).to(tl.float32) - voters, voters)


@triton.jit
def _apply_kernel(target_ptr, param_ptr, ema_ptr, planes_ptr, n_bytes, voters, beta, one_minus_beta, correction,
                  decay, neg_lr, T_BF16: tl.constexpr, P_BF16: tl.constexpr, HAS_MASTER: tl.constexpr,
                  MAJORITY: tl.constexpr, SCALED: tl.constexpr, B: tl.constexpr, BYTES: tl.constexpr):
    byte, bit = _tile(BYTES)
    offs = byte[:, None] * 8 + bit[None, :]
    in_bounds = byte < n_bytes
    mask = in_bounds[:, None]
    if MAJORITY:  # one plane, one voter: -1/+1 straight from the bit, no division
        vote = tl.load(planes_ptr + byte, mask=in_bounds, other=0).to(tl.int32)
        direction = tl.where(((vote[:, None] >> bit[None, :]) & 1) != 0, 1.0, -1.0)
    else:
        direction = _average_step(planes_ptr, byte, bit, in_bounds, n_bytes, voters, B, BYTES)
    if SCALED:  # torch: ema = (ema * beta).add(s, alpha=1 - beta); step s * h * h, h = ema * correction
        ema = tl.fma(direction, one_minus_beta, tl.load(ema_ptr + offs, mask=mask, other=0.0) * beta)
        tl.store(ema_ptr + offs, ema, mask=mask)
        unbiased = ema * correction
        direction = (direction * unbiased) * unbiased
    x = _load_f32(target_ptr, offs, mask, T_BF16) * decay  # torch: x.mul(1 - lr*wd), rounded
    x = tl.fma(direction, neg_lr, x)                         # torch: .add(direction, alpha=-lr)
    _store_f32(target_ptr, offs, x, mask, T_BF16)
    if HAS_MASTER:
        _store_f32(param_ptr, offs, x, mask, P_BF16)


def _apply_operands(param: Tensor, master: Tensor | None) -> tuple[Tensor, Tensor, dict]:
    """Check param/master and return (target, param) kernel operands and dtype flags."""
    numel = param.numel()
    _check_numel(numel)
    _check_flat("param", param, numel)
    if master is None:
        return _bits_view(param), _bits_view(param), {
            "T_BF16": param.dtype == _BF16, "P_BF16": param.dtype == _BF16, "HAS_MASTER": False}
    _check_flat("master", master, numel)
    if master.dtype != torch.float32:
        raise ValueError(f"master must be float32, got {master.dtype}")
    return master, _bits_view(param), {
        "T_BF16": False, "P_BF16": param.dtype == _BF16, "HAS_MASTER": True}


def apply(param: Tensor, planes: Tensor, *, voters: int, lr: float, weight_decay: float,
          master: Tensor | None = None, vote_ema: Tensor | None = None, beta: float = 0.0, step: int = 1) -> None:
    """Apply the voted step (see ``distlion.kernels.contract``) to master (or param) and param, in one pass."""
    target, out, flags = _apply_operands(param, master)
    n_bytes = param.numel() // 8
    if planes.dim() != 2:
        raise ValueError(f"planes must be [P, C], got shape {tuple(planes.shape)}")
    _check_bytes("planes", planes, (planes.shape[0], n_bytes))
    if not 1 <= voters < 1 << 24:  # 2*count - N must be exact in fp32
        raise ValueError(f"voters must be in [1, 2**24), got {voters}")
    if vote_ema is not None:
        _check_flat("vote_ema", vote_ema, param.numel())
        if vote_ema.dtype != torch.float32:
            raise ValueError(f"vote_ema must be float32, got {vote_ema.dtype}")
    if n_bytes == 0:
        return
    scaled = vote_ema is not None
    bytes_per_program = BLOCK // 8
    grid = (triton.cdiv(n_bytes, bytes_per_program),)
    _apply_kernel[grid](
        target, out, vote_ema if scaled else target, planes, n_bytes, float(voters), _f32(beta), _f32(1.0 - beta),
        _f32(bias_correction(beta, step)) if scaled else 1.0, _f32(1.0 - lr * weight_decay), _f32(-lr), **flags,
        MAJORITY=voters == 1 and planes.shape[0] == 1, SCALED=scaled, B=planes.shape[0], BYTES=bytes_per_program,
        num_warps=NUM_WARPS, enable_fp_fusion=False)

