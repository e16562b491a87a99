"""Fast kernels in plain torch ops, for CPU (and any device without Triton).

Each function walks its flat bucket in chunks of ``CHUNK`` coordinates so that the
few temporaries of a chunk stay in cache; the packed domain is handled as int64 words
(8 bytes = 64 coordinates) with shift/and/or/multiply, never one Python op per bit.
Implements the ops of ``distlion.kernels.contract`` (plus the helpers ``pack_signs`` and
``nonfinite``), bitwise equal to the reference backend.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import Tensor

from distlion.kernels.arithmetic import average_steps, scaled_step
from distlion.kernels.gather import pack_after_gather

CHUNK = 1 << 16  # coordinates per chunk: temporaries of ~0.5 MB stay in L2

# Gathers the low bit of each of 8 bytes into the top byte: byte j lands on bit 56+j.
_GATHER = 0x0102040810204080
# Zero-rule pattern as 0/1 bytes: positive where (coordinate index + parity) is even.
_EVEN_BYTES = 0x0001000100010001  # bytes 0, 2, 4, 6 set
_ODD_BYTES = _EVEN_BYTES << 8     # bytes 1, 3, 5, 7 set
_ZERO_PATTERN = (_EVEN_BYTES, _ODD_BYTES)  # indexed by parity


def _chunks(numel: int):
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)


def _pack_words(words: Tensor, out: Tensor) -> None:
    """Pack int64 words of eight 0/1 bytes into ``out`` bytes (``words`` is clobbered)."""
    words.mul_(_GATHER).bitwise_right_shift_(56)
    out.copy_(words)  # int64 -> uint8 keeps the low byte


def pack_signs(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> None:
    # numpy's comparisons and packbits run several times faster than torch's on CPU
    pack_chunk = _NumpyPacker if grad.device.type == "cpu" else _TorchPacker
    pack_into(grad, momentum, out, beta1=beta1, parity=parity, packer=pack_chunk)


def pack_into(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int, packer: type) -> None:
    """``pack_signs`` with a chosen ``packer`` class (the tests compare both)."""
    width = min(CHUNK, grad.numel())
    # scratch reused by every chunk: fresh large allocations would cost page faults
    c = torch.empty(width, dtype=torch.float32, device=grad.device)
    pack = packer(width, grad.device, parity)
    for lo, hi in _chunks(grad.numel()):
        n = hi - lo
        torch.mul(momentum[lo:hi].float(), beta1, out=c[:n])
        c[:n].add_(grad[lo:hi], alpha=1.0 - beta1)  # one fma, as the contract says
        pack(c[:n], out[lo // 8:hi // 8])


class _TorchPacker:
    """Pack the signs of c (zero rule included) with torch ops on int64 words; any device."""

    def __init__(self, width: int, device: torch.device, parity: int):
        self.positive = torch.empty(width, dtype=torch.bool, device=device)
        self.zero = torch.empty(width, dtype=torch.bool, device=device)
        self.words = torch.empty(width // 8, dtype=torch.int64, device=device)
        self.pattern = _ZERO_PATTERN[parity % 2]

    def __call__(self, c: Tensor, out: Tensor) -> None:
        n = c.numel()
        positive, zero, words = self.positive[:n], self.zero[:n], self.words[:n // 8]
        torch.gt(c, 0, out=positive)
        torch.eq(c, 0, out=zero)
        torch.bitwise_and(zero.view(torch.int64), self.pattern, out=words)
        words.bitwise_or_(positive.view(torch.int64))
        _pack_words(words, out)


class _NumpyPacker:
    """Pack the signs of c (zero rule included) with numpy; CPU tensors only."""

    def __init__(self, width: int, device: torch.device, parity: int):
        self.positive = np.empty(width, dtype=np.bool_)
        self.zero = np.empty(width, dtype=np.bool_)
        self.pattern = (np.arange(width) + parity) % 2 == 0  # chunks start at even indices

    def __call__(self, c: Tensor, out: Tensor) -> None:
        n = c.numel()
        positive, zero = self.positive[:n], self.zero[:n]
        values = c.numpy()
        np.greater(values, 0, out=positive)
        np.equal(values, 0, out=zero)
        np.bitwise_and(zero, self.pattern[:n], out=zero)
        np.bitwise_or(positive, zero, out=positive)
        out.numpy()[:] = np.packbits(positive, bitorder="little")


def pack_signs_and_check(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> Tensor:
    flag = nonfinite(grad)
    pack_signs(grad, momentum, out, beta1=beta1, parity=parity)
    return flag


def pack_signs_and_momentum(grad: Tensor, momentum: Tensor, out: Tensor, momentum_out: Tensor, *, beta1: float,
                            beta2: float, parity: int) -> Tensor:
    flag = pack_signs_and_check(grad, momentum, out, beta1=beta1, parity=parity)
    new = torch.empty(min(CHUNK, grad.numel()), dtype=torch.float32, device=grad.device)
    for lo, hi in _chunks(grad.numel()):  # chunk by chunk, so momentum_out may be grad itself
        n = hi - lo
        torch.mul(momentum[lo:hi].float(), beta2, out=new[:n])
        new[:n].add_(grad[lo:hi].float(), alpha=1.0 - beta2)
        momentum_out[lo:hi].copy_(new[:n])
    return flag


pack_grads_and_momentum = partial(pack_after_gather, pack_signs_and_momentum)


def update_momentum(grad: Tensor, momentum: Tensor, *, beta2: float) -> None:
    if momentum.dtype == torch.float32 and grad.dtype == torch.float32:
        momentum.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return
    for lo, hi in _chunks(grad.numel()):
        new = (momentum[lo:hi].float() * beta2).add_(grad[lo:hi].float(), alpha=1.0 - beta2)
        momentum[lo:hi].copy_(new)


def nonfinite(grad: Tensor) -> Tensor:
    if grad.device.type == "cpu":
        # A finite sum proves every element finite (inf and nan propagate): one fast pass.
        # Only a non-finite sum, or one that overflowed, needs the exact element check.
        total = grad.sum()
        if torch.isfinite(total):
            return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(grad).all()


def _bit_sliced_counts(words: Tensor) -> list[Tensor]:
    """Add N rows of 64-coordinate words bit-sliced: planes[i] holds bit i of each count."""
    planes: list[Tensor] = []
    for row in words:
        carry = row.clone()
        for plane in planes:
            new_carry = plane & carry
            plane.bitwise_xor_(carry)
            carry = new_carry
        planes.append(carry)  # the top plane starts as the last carry (zero until needed)
    return planes


def _compare_constant(planes: list[Tensor], constant: int) -> tuple[Tensor, Tensor]:
    """Return (count > constant, count == constant) as bit masks, MSB first."""
    greater = torch.zeros_like(planes[0])
    equal = torch.full_like(planes[0], -1)
    for i in reversed(range(len(planes))):
        if (constant >> i) & 1:
            equal &= planes[i]
        else:
            greater |= equal & planes[i]
            equal &= ~planes[i]
    return greater, equal


def majority_vote(packed: Tensor, out: Tensor, *, casting_rank: int) -> None:
    world_size = packed.shape[0]
    words = packed.view(torch.int64)
    out_words = out.view(torch.int64)
    width = max(CHUNK // 64, 1)
    for lo in range(0, words.shape[1], width):
        hi = min(lo + width, words.shape[1])
        planes = _bit_sliced_counts(words[:, lo:hi])
        greater, equal = _compare_constant(planes, world_size // 2)
        if world_size % 2 == 0:  # a tie: the casting rank's bit decides
            greater |= equal & words[casting_rank, lo:hi]
        out_words[lo:hi] = greater


def vote_counts(packed: Tensor, out: Tensor) -> None:
    words = packed.view(torch.int64)
    out_words = out.view(out.shape[0], -1).view(torch.int64)
    width = max(CHUNK // 64, 1)
    for lo in range(0, words.shape[1], width):
        hi = min(lo + width, words.shape[1])
        planes = _bit_sliced_counts(words[:, lo:hi])
        for i in range(out.shape[0]):
            out_words[i, lo:hi] = planes[i] if i < len(planes) else 0


_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def _byte_table(kind: str, device: torch.device) -> Tensor:
    """Return a [256, 8] lookup table: row b holds the 8 bits of byte b as ``kind``."""
    key = (kind, device)
    if key not in _TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = bits.to(torch.uint8) if kind == "bits" else (bits * 2 - 1).to(torch.float32)
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _unpack(packed: Tensor, kind: str) -> Tensor:
    """Unpack bytes through the table: ``"bits"`` gives 0/1 uint8, ``"signs"`` gives -1/+1 fp32."""
    return torch.index_select(_byte_table(kind, packed.device), 0, packed.to(torch.int32)).view(-1)


def _apply_direction(target: Tensor, direction: Tensor, lr: float, weight_decay: float) -> None:
    if target.dtype == torch.float32:
        if weight_decay != 0.0:
            target.mul_(1.0 - lr * weight_decay)
        target.add_(direction, alpha=-lr)
    else:
        target.copy_((target.float() * (1.0 - lr * weight_decay)).add_(direction, alpha=-lr))


class _MajorityDirections:
    """The -1/+1 steps of one vote plane, chunk by chunk, through a byte table into reused buffers."""

    def __init__(self, vote: Tensor, numel: int):
        self.vote = vote
        self.table = _byte_table("signs", vote.device)
        self.direction = torch.empty(min(CHUNK, numel) // 8, 8, dtype=torch.float32, device=vote.device)
        self.index = torch.empty(self.direction.shape[0], dtype=torch.int32, device=vote.device)

    def __call__(self, lo: int, hi: int) -> Tensor:
        index, direction = self.index[:(hi - lo) // 8], self.direction[:(hi - lo) // 8]
        index.copy_(self.vote[lo // 8:hi // 8])
        torch.index_select(self.table, 0, index, out=direction)
        return direction.view(-1)


class _CountDirections:
    """The steps (2k - N) / N of the counts spelled by bit-planes, chunk by chunk."""

    def __init__(self, planes: Tensor, voters: int):
        self.planes = planes
        self.steps = average_steps(voters).to(planes.device)

    def __call__(self, lo: int, hi: int) -> Tensor:
        count = torch.zeros(hi - lo, dtype=torch.int32, device=self.planes.device)
        for i in range(self.planes.shape[0]):
            count += _unpack(self.planes[i, lo // 8:hi // 8], "bits").to(torch.int32) << i
        return self.steps[count]


def apply(param: Tensor, planes: Tensor, *, voters: int, lr: float, weight_decay: float,
          master: Tensor | None = None, vote_ema: Tensor | None = None, beta: float = 0.0, step: int = 1) -> None:
    target = param if master is None else master
    # A majority vote's steps are -1/+1: a table lookup per byte, no counts to add up.
    majority = voters == 1 and planes.shape[0] == 1
    directions = _MajorityDirections(planes[0], param.numel()) if majority else _CountDirections(planes, voters)
    for lo, hi in _chunks(param.numel()):
        direction = directions(lo, hi)
        if vote_ema is not None:
            direction = scaled_step(direction, vote_ema[lo:hi], beta=beta, step=step)
        _apply_direction(target[lo:hi], direction, lr, weight_decay)
        if master is not None:
            param[lo:hi].copy_(master[lo:hi])

