"""Momentum sync: the voters' local momenta averaged every K steps (``momentum_sync_every``).

Under the vote each voter's momentum follows its own gradients only, so the momenta
drift apart and the voters' signs disagree more than global Lion's single momentum
would. Every ``every`` applied steps (skipped steps do not count; default 32) each
voter's momentum becomes the mean of all voters' momenta (Lion Cub, arXiv 2411.16462,
also synchronises momenta, selectively):

    m_i <- bf16(sum_j bf16(m_j / M))      one ring all-reduce over the vote group, in bf16

The sum runs in the all-reduce's order, the same result on every voter. With nodes
(``ranks_per_node`` > 1) rank j of every node averages chunk j, the chunk it votes on.
Bytes: a bf16 ring all-reduce of the voter's momentum, 2 * (M-1)/M * 2 bytes per
coordinate per sync, counted with the vote's bytes (inter-node) in ``comm_stats``;
amortised over K steps that is 24/K bits per coordinate per step at M = 4 (the majority
vote's exchange sends 1.5).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.comm import CommStats, ring_allreduce_bytes
from distlion.comm.flat import wait_for

SYNC_DTYPE = torch.bfloat16


def check_every(every: Any) -> None:
    """Raise a ValueError naming a bad ``momentum_sync_every`` and the fix."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"Invalid momentum_sync_every: {every!r}; use a whole number of steps >= 1 (e.g. 50: the "
                         f"momenta are averaged every 50 steps), or None for no sync")


class MomentumSync:
    """Averages ``voters`` voters' momenta over ``group`` every ``every`` steps (None: never)."""

    def __init__(self, every: int | None, group: Any, voters: int, stats: CommStats, timeout: timedelta | None):
        check_every(every)
        self.every = every
        self.group = group
        self.voters = voters
        self.stats = stats
        self.timeout = timeout

    def due(self, step: int) -> bool:
        """True when ``step`` (1-based, applied steps) ends with a sync."""
        return self.every is not None and self.voters > 1 and step % self.every == 0

    @torch.no_grad()
    def sync(self, momenta: list[Tensor]) -> None:
        """Replace each momentum buffer by the voters' mean, in place (every voter calls this at the same step)."""
        sent = 0
        works = []
        for momentum in momenta:
            wire = (momentum.float() / self.voters).to(SYNC_DTYPE)
            works.append((momentum, wire, dist.all_reduce(wire, group=self.group, async_op=True)))
            sent += ring_allreduce_bytes(wire.numel() * wire.element_size(), self.voters)
        for momentum, wire, work in works:
            wait_for(work, "the momentum sync", self.timeout)
            momentum.copy_(wire)
        self.stats.count_inter_node(sent=sent, received=sent)
