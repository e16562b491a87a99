"""Plain reference kernels: the oracle every fast path is tested against.

Written for clarity, not speed: signs are unpacked to one bool per coordinate and
votes are counted with ``sum``. It implements the ops of ``distlion.kernels.contract``
(where their arithmetic is declared), plus ``pack_signs`` and ``nonfinite``, the two
halves of ``pack_signs_and_check``. Only the tests import this module.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from distlion.kernels.arithmetic import average_steps, scaled_step
from distlion.kernels.gather import pack_after_gather

_BIT_WEIGHTS = [1 << j for j in range(8)]  # bit j of byte k is coordinate 8k + j


def _unpack_bits(packed: Tensor) -> Tensor:
    """Return one bool per bit of ``packed`` (uint8, any shape), bit order little-endian."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2).bool()


def _pack_bits(bits: Tensor) -> Tensor:
    """Return uint8 bytes holding ``bits`` (bool, last dim a multiple of 8)."""
    weights = torch.tensor(_BIT_WEIGHTS, device=bits.device, dtype=torch.int32)
    grouped = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def interpolate(grad: Tensor, momentum: Tensor, beta1: float) -> Tensor:
    """Return c = beta1*m + (1-beta1)*g in fp32, rounded as torch's ``mul`` then ``add(alpha=)``."""
    return (momentum.float() * beta1).add(grad.float(), alpha=1.0 - beta1)


def zero_rule_bits(numel: int, parity: int, device) -> Tensor:
    """Return the sign a coordinate with c == 0 takes: + where (index + parity) is even."""
    index = torch.arange(numel, device=device)
    return (index + parity) % 2 == 0


def pack_signs(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> None:
    c = interpolate(grad, momentum, beta1)
    positive = (c > 0) | ((c == 0) & zero_rule_bits(c.numel(), parity, c.device))
    out.copy_(_pack_bits(positive))


def pack_signs_and_check(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, parity: int) -> Tensor:
    pack_signs(grad, momentum, out, beta1=beta1, parity=parity)
    return nonfinite(grad)



def pack_signs_and_momentum(grad: Tensor, momentum: Tensor, out: Tensor, momentum_out: Tensor, *, beta1: float,
                            beta2: float, parity: int) -> Tensor:
    flag = pack_signs_and_check(grad, momentum, out, beta1=beta1, parity=parity)
    new = (momentum.float() * beta2).add(grad.float(), alpha=1.0 - beta2)
    momentum_out.copy_(new)  # may be grad itself: everything is read above
    return flag


pack_grads_and_momentum = partial(pack_after_gather, pack_signs_and_momentum)


def update_momentum(grad: Tensor, momentum: Tensor, *, beta2: float) -> None:
    new = (momentum.float() * beta2).add(grad.float(), alpha=1.0 - beta2)
    momentum.copy_(new)


def nonfinite(grad: Tensor) -> Tensor:
    return (~torch.isfinite(grad)).any()


def _positive_counts(packed: Tensor) -> Tensor:
    return _unpack_bits(packed).sum(0)


def majority_vote(packed: Tensor, out: Tensor, *, casting_rank: int) -> None:
    world_size = packed.shape[0]
    count = _positive_counts(packed)
    casting = _unpack_bits(packed[casting_rank])
    vote = (2 * count > world_size) | ((2 * count == world_size) & casting)
    out.copy_(_pack_bits(vote).view_as(out))


def vote_counts(packed: Tensor, out: Tensor) -> None:
    count = _positive_counts(packed)
    planes = [((count >> i) & 1).bool() for i in range(out.shape[0])]
    out.copy_(torch.stack([_pack_bits(p) for p in planes]))


def _counts(planes: Tensor) -> Tensor:
    """Return the per-coordinate vote counts spelled by the bit-planes ``planes`` [P, C]."""
    count = torch.zeros(planes.shape[1] * 8, dtype=torch.int64, device=planes.device)
    for i in range(planes.shape[0]):
        count += _unpack_bits(planes[i]).long() << i
    return count


def apply(param: Tensor, planes: Tensor, *, voters: int, lr: float, weight_decay: float,
          master: Tensor | None = None, vote_ema: Tensor | None = None, beta: float = 0.0, step: int = 1) -> None:
    direction = average_steps(voters).to(param.device)[_counts(planes)]
    if vote_ema is not None:
        direction = scaled_step(direction, vote_ema, beta=beta, step=step)
    target = param if master is None else master
    updated = (target.float() * (1.0 - lr * weight_decay)).add(direction, alpha=-lr)
    target.copy_(updated)
    if master is not None:
        param.copy_(master)
