"""The vote rule: how the voters' signs become one step, in one place.

Built once from the ``vote`` option and the number of voters (ranks, or nodes when a
node votes as one worker). It owns the number of bit-planes the exchange brings back,
the vote kernel run on the gathered signs, and the apply call that turns those planes
into the update::

    majority:  D = sign(sum_i s_i), one plane; a tie (even voters) goes to voter step % voters
    average:   D = (1/M) * sum_i s_i, ceil(log2(M + 1)) planes holding the count of + votes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from distlion.kernels import kernels_for

VOTES = ("majority", "average")


def count_planes(voters: int) -> int:
    """Bits needed to send a vote count in 0..M: ceil(log2(M + 1))."""
    return max(1, math.ceil(math.log2(voters + 1)))


@dataclass(frozen=True)
class VoteRule:
    """The ``vote`` ("majority" or "average") of ``voters`` voters."""

    vote: str
    voters: int

    def __post_init__(self):
        if self.vote not in VOTES:
            raise ValueError(f"Invalid vote: {self.vote!r}; use one of {VOTES}")

    @property
    def planes(self) -> int:
        """Bit-planes of the voted result: the majority's bit, or the count of + votes."""
        return 1 if self.vote == "majority" else count_planes(self.voters)

    @property
    def _apply_voters(self) -> int:
        return 1 if self.vote == "majority" else self.voters  # a majority plane is a count out of one

    def kernel(self, step: int) -> Callable[[Tensor, Tensor], None]:
        """Return the vote of ``step``: (packed signs [M, C], out planes [P, C]) -> None."""
        casting_voter = step % self.voters  # rotates, so ties favour no voter

        def vote(packed: Tensor, out: Tensor) -> None:
            kernels = kernels_for(packed.device)
            if self.vote == "majority":
                kernels.majority_vote(packed, out[0], casting_rank=casting_voter)
            else:
                kernels.vote_counts(packed, out)
        return vote

    def apply(self, param: Tensor, planes: Tensor, *, lr: float, weight_decay: float, master: Tensor | None,
              vote_ema: Tensor | None, beta: float | None, step: int) -> None:
        """Apply the voted ``planes`` to ``param`` (or its fp32 ``master``) with decoupled weight decay.

        With ``vote_ema`` (the scaled step), the step is scaled by its squared, bias-corrected EMA.
        """
        kernels_for(param.device).apply(param, planes, voters=self._apply_voters, lr=lr, weight_decay=weight_decay,
                                        master=master, vote_ema=vote_ema, beta=0.0 if beta is None else beta,
                                        step=step)
