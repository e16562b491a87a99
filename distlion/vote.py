"""The vote rule: how the voters' signs become one step, in one place.

Built once from the ``vote`` option, the number of voters (ranks, or nodes when a node
votes as one worker) and Lion-K's ``k``. It owns the bits each voter packs per
coordinate, the number of bit-planes the exchange brings back, the vote kernel run on the
gathered bits, and the apply call that turns those planes into the update::

    k="sign" (Lion), 1 bit per voter and coordinate:
        majority:  D = sign(sum_i s_i), one plane; a tie (even voters) goes to voter step % voters
        average:   D = (1/M) * sum_i s_i, ceil(log2(M + 1)) planes holding the count of + votes
    k="dead_zone" or "top" (Lion-K, ternary t_i in {-1, 0, +1}; ``distlion.kernels.ternary``),
    2 bits per voter and coordinate:
        majority:  D = sign(sum_i t_i) in {-1, 0, +1} (a zero sum does not move), 2 planes
        average:   D = (1/M) * sum_i t_i, ceil(log2(2M + 1)) planes, rounded up to an even number
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from distlion.kernels import kernels_for, ternary

VOTES = ("majority", "average")
K_RULES = ("sign", *ternary.RULES)


def count_planes(voters: int) -> int:
    """Bits needed to send a vote count in 0..M: ceil(log2(M + 1))."""
    return max(1, math.ceil(math.log2(voters + 1)))


@dataclass(frozen=True)
class VoteRule:
    """The ``vote`` ("majority" or "average") of ``voters`` voters on Lion-K's ``k`` of c.

    ``k_threshold`` (k="dead_zone": a coordinate moves where |c| > k_threshold * mean |c|
    of the voter's bucket) and ``k_fraction`` (k="top": the top fraction of |c| moves)
    matter only for their rule.
    """

    vote: str
    voters: int
    k: str = "sign"
    k_threshold: float = 1.0
    k_fraction: float = 0.1

    def __post_init__(self):
        if self.vote not in VOTES:
            raise ValueError(f"Invalid vote: {self.vote!r}; use one of {VOTES}")
        if self.k not in K_RULES:
            raise ValueError(f"Invalid k: {self.k!r}; use one of {K_RULES}")

    @property
    def ternary(self) -> bool:
        """True for Lion-K's ternary rules: two packed planes per voter (plus, minus) instead of the sign."""
        return self.k != "sign"

    @property
    def packed_planes(self) -> int:
        """Bits each voter packs per coordinate: 1 (its sign), or 2 (ternary: plus and minus)."""
        return 2 if self.ternary else 1

    @property
    def _count_planes(self) -> int:
        """Bit-planes of the voted count that ``apply`` reads."""
        if self.ternary:
            return 2 if self.vote == "majority" else count_planes(2 * self.voters)
        return 1 if self.vote == "majority" else count_planes(self.voters)

    @property
    def planes(self) -> int:
        """Rows of the voted result the exchange brings back, each as wide as a voter's packed bits:
        the majority's bit or the count of + votes; ternary: pairs of count planes, interleaved."""
        return math.ceil(self._count_planes / 2) if self.ternary else self._count_planes

    @property
    def _apply_voters(self) -> int:
        if self.ternary:  # the count k = r + 1 out of 2, or M + #plus - #minus out of 2M
            return 2 if self.vote == "majority" else 2 * self.voters
        return 1 if self.vote == "majority" else self.voters  # a majority plane is a count out of one

    def pack(self, grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float) -> Tensor:
        """Pack a ternary rule's plus/minus planes of c into ``out`` [2 * d/8]; return the non-finite flag."""
        return ternary.pack_ternary(grad, momentum, out, beta1=beta1, rule=self.k, threshold=self.k_threshold,
                                    fraction=self.k_fraction)

    def kernel(self, step: int, voters: int | None = None) -> Callable[[Tensor, Tensor], None]:
        """Return the vote of ``step``: (packed bits [M, C], out planes [P, C]) -> None.

        ``voters``: the M of this step when it differs from the rule's (a quorum's, ``distlion.torchft``).
        """
        casting_voter = step % (voters or self.voters)  # rotates, so ties favour no voter

        def vote(packed: Tensor, out: Tensor) -> None:
            kernels = kernels_for(packed.device)
            if self.ternary:
                ternary.vote(kernels, packed, out, average=self.vote == "average")
            elif self.vote == "majority":
                kernels.majority_vote(packed, out[0], casting_rank=casting_voter)
            else:
                kernels.vote_counts(packed, out)
        return vote

    def apply(self, param: Tensor, planes: Tensor, *, lr: float, weight_decay: float, master: Tensor | None,
              vote_ema: Tensor | None, beta: float | None, step: int) -> None:
        """Apply the voted ``planes`` to ``param`` (or its fp32 ``master``) with decoupled weight decay.

        With ``vote_ema`` (the scaled step), the step is scaled by its squared, bias-corrected EMA.
        """
        if self.ternary:
            planes = ternary.unfold(planes)
        kernels_for(param.device).apply(param, planes, voters=self._apply_voters, lr=lr, weight_decay=weight_decay,
                                        master=master, vote_ema=vote_ema, beta=0.0 if beta is None else beta,
                                        step=step)
