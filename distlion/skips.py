"""Agreed skips: count them, name what is non-finite on this rank, and say when the run has stalled.

A step is skipped on every rank when any rank's gradient holds inf or nan (or GradScaler
found one). The warnings name the rank and parameter where this rank holds the bad values,
and the voters whose headers flagged it (``distlion.agreement``) where it does not.
"""

from __future__ import annotations

import logging

from distlion.comm import CommStats

logger = logging.getLogger("distlion.optim")

STALLED_AFTER = 10  # agreed skips in a row after which the run is reported as stalled


class SkipReport:
    """Counts agreed skips in ``stats`` and reports them once, and a stall after ``STALLED_AFTER`` in a row."""

    def __init__(self, stats: CommStats, rank: int):
        self.stats = stats
        self.rank = rank
        self.in_a_row = 0
        self._warned = False

    def applied(self) -> None:
        """A step was applied: the run moves again."""
        self.in_a_row = 0

    def skipped(self, step: int, flagged_voters: list[int], here: list[str]) -> None:
        """Record a skip of ``step``; ``here`` names this rank's non-finite values (empty: none)."""
        self.stats.skipped_steps += 1
        self.in_a_row += 1
        if not self._warned and here:
            logger.warning("DistLion: rank %d holds non-finite values at step %d: %s. Every rank skips the step "
                           "(no momentum update, no decay).", self.rank, step, "; ".join(here))
        elif not self._warned:
            logger.warning("DistLion: a non-finite gradient at step %d on voter(s) %s of the vote group (or "
                           "GradScaler's found_inf); every rank skipped the step (no momentum update, no decay). "
                           "Further skips are counted in comm_stats.skipped_steps.", step, flagged_voters)
        self._warned = True
        if self.in_a_row == STALLED_AFTER:
            logger.warning("DistLion: the run is stalled: every rank skipped the last %d steps (voter(s) %s of the "
                           "vote group report non-finite gradients%s). Parameters do not move; fix the values "
                           "named above or restart from a checkpoint.", STALLED_AFTER, flagged_voters,
                           f"; here: {'; '.join(here)}" if here else "")
