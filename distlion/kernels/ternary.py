"""Lion-K with a ternary gradient of K: pack, vote and unfold two bit-planes per voter.

Lion-K replaces sign(c) by the (sub)gradient of a convex K (Chen, Liu et al., Table 2).
Two choices of K keep the update in {-1, 0, +1}, so each voter sends 2 bits per
coordinate instead of 1:

    "dead_zone" (line 3, K(x) = sum_i max(|x_i| - e, 0)):  t = sign(c) * 1(|c| > e),
                e = threshold * mean(|c|) over the coordinates the voter packs in the bucket
    "top"       (line 4, K = the sum of the i_cut largest |x_i|): t = sign(c) * 1(|c| >= |c|_(k)),
                |c|_(k) the k-th largest |c| of those coordinates, k = ceil(fraction * d)
                (ties at |c|_(k) move too)

c = 0 gives t = 0: no zero rule is needed. A voter's planes are ``plus = t > 0`` and
``minus = t < 0``, packed as the contract packs signs (bit j of byte k is coordinate
8k + j) and interleaved byte by byte (byte 2k: plus, 2k + 1: minus), so any even cut of
the bytes (the chunks of the two-phase exchange) keeps each coordinate's two bits together.

The vote of M voters, the only new arithmetic, reuses the contract's count and apply:

    majority: r = sign(sum_i t_i) in {-1, 0, +1} (a zero sum does not move; no ties to
              break) is the count k = r + 1 of ``apply`` with voters = 2
    average:  (1/M) sum_i t_i is the count k = M + #plus - #minus of ``apply`` with
              voters = 2M, since (2k - 2M) / 2M = (#plus - #minus) / M

k = M + #plus - #minus is the number of set bits in the 2M rows [plus_i; ~minus_i]
(``vote_counts``); r > 0 where more than half of those 2M rows are set, r < 0 where more
than half of [~plus_i; minus_i] are (two ``majority_vote`` calls on 2M + 1 rows, the last
all zero, so there is never a tie). The voted planes come back interleaved the same way
and ``unfold`` turns them into the [P, C] planes ``apply`` takes.

Composed of the contract's ops (any backend) and torch ops on packed bytes: it runs on
every device, and allocates its temporaries per step (the sign path allocates none).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

RULES = ("dead_zone", "top")


def moving(magnitude: Tensor, rule: str, *, threshold: float, fraction: float) -> Tensor:
    """Which coordinates move (bool), from ``magnitude`` = |c| (fp32) of one voter's bucket.

    "dead_zone": |c| > threshold * mean(|c|); "top": |c| >= the ceil(fraction * d)-th largest |c|.
    """
    if rule == "dead_zone":
        return magnitude > magnitude.mean() * threshold
    if rule == "top":
        count = min(magnitude.numel(), max(1, math.ceil(fraction * magnitude.numel())))
        kth = torch.topk(magnitude, count, sorted=False).values.min()
        return magnitude >= kth
    raise ValueError(f"Invalid ternary rule: {rule!r}; use one of {RULES}")


def pack_bools(bools: Tensor) -> Tensor:
    """Pack ``bools`` (numel a multiple of 8) into uint8 as the contract packs signs: bit j of byte k is 8k + j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bools.device)
    return (bools.reshape(-1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def pack_ternary(grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float, rule: str, threshold: float,
                 fraction: float) -> Tensor:
    """Pack this voter's t = sign(c) * 1(moves) as interleaved plus/minus planes into ``out`` [2 * d/8].

    c = fp32(momentum)*beta1 + fp32(grad)*(1-beta1), rounded as the contract's pack rounds
    it. Returns whether ``grad`` holds an inf or a nan (0-dim bool, no host sync); the
    momentum is not touched.
    """
    c = (momentum.float() * beta1).add(grad.float(), alpha=1.0 - beta1)
    moves = moving(c.abs(), rule, threshold=threshold, fraction=fraction)
    planes = out.view(-1, 2)
    planes[:, 0].copy_(pack_bools((c > 0) & moves))
    planes[:, 1].copy_(pack_bools((c < 0) & moves))
    return (~torch.isfinite(grad)).any()


def vote(kernels: ModuleType, packed: Tensor, out: Tensor, *, average: bool) -> None:
    """The ternary vote of the M rows of ``packed`` [M, 2C] (interleaved plus/minus) into ``out`` [X, 2C].

    ``out`` holds the bit-planes of the count k (majority: k = r + 1 out of 2; average: k =
    M + #plus - #minus out of 2M), interleaved: plane 2x + h in bytes h, h + 2, ... of row x.
    """
    voters = packed.shape[0]
    rows = packed.view(voters, -1, 2)
    plus, minus = rows[..., 0], rows[..., 1]
    columns = plus.shape[1]
    planes = out.view(out.shape[0], columns, 2)
    if average:
        count = torch.empty(2 * out.shape[0], columns, dtype=torch.uint8, device=packed.device)
        kernels.vote_counts(torch.cat([plus, ~minus]), count)
        planes.copy_(count.view(out.shape[0], 2, columns).transpose(1, 2))
        return
    zero = torch.zeros(1, columns, dtype=torch.uint8, device=packed.device)
    up = torch.empty(columns, dtype=torch.uint8, device=packed.device)
    down = torch.empty_like(up)
    kernels.majority_vote(torch.cat([plus, ~minus, zero]), up, casting_rank=2 * voters)  # k > M: r = +1
    kernels.majority_vote(torch.cat([~plus, minus, zero]), down, casting_rank=2 * voters)  # k < M: r = -1
    planes[0, :, 0].copy_(~(up | down))  # bit 0 of r + 1: r == 0
    planes[0, :, 1].copy_(up)            # bit 1 of r + 1: r == +1


def unfold(voted: Tensor) -> Tensor:
    """The interleaved voted planes [X, 2C] as the [2X, C] bit-planes ``apply`` takes (a copy)."""
    rows, width = voted.shape
    return voted.view(rows, width // 2, 2).transpose(1, 2).reshape(2 * rows, width // 2)
