"""Tell when the gradients were averaged across ranks before DistLion saw them.

Kept DDP (torchrun's usual wrapper), an unchanged ``accelerator.prepare`` or the Hugging
Face Trainer all-reduce fp32 gradients before ``step()``: training is correct, but the
full all-reduce still runs and DistLion's bytes come on top. Every voter then packs the
same signs, which the vote already has in hand: the check compares the packed rows it
votes on (its chunk of every voter's signs) during the first ``WATCHED_STEPS`` steps, so
it sends nothing. Identical signs on every watched step with non-zero local gradients
warn once, on every rank, and set ``comm_stats.gradients_already_averaged`` (a rank whose
votes cover bucket padding only, in a model smaller than 64 coordinates per voter, cannot
judge and stays silent). The same
batch on every rank gives the same signs too; the warning names both causes.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import Tensor

from distlion.comm import CommStats

logger = logging.getLogger(__name__)

WATCHED_STEPS = 3

WARNING = (
    "DistLion: every voter packed identical signs on each of the first %d steps while the gradients were "
    "non-zero: the gradients were averaged across ranks before DistLion saw them (or every rank trains on the "
    "same batch). The fp32 all-reduce still runs, so DistLion saves nothing. Fix: torchrun: do not wrap the "
    "model in DistributedDataParallel (DistLion keeps replicas identical); Accelerate: call "
    "distlion.accelerate.prepare instead of accelerator.prepare; DeepSpeed (also through Accelerate or Trainer): "
    "import distlion.deepspeed before the engine is built; Hugging Face Trainer: use "
    "distlion.transformers.DistLionTrainer. Give each rank its own data (DistributedSampler). "
    "comm_stats.gradients_already_averaged is now True.")


class AveragedGradientsCheck:
    """Watches the first ``WATCHED_STEPS`` votes of ``voters`` voters for identical packed signs."""

    def __init__(self, voters: int, stats: CommStats, judges: bool = True):
        self.stats = stats
        # one voter: nothing to compare; a rank that votes on bucket padding only sees no evidence either way
        self.done = voters < 2 or not judges
        self._identical_steps = 0
        self._differ = False

    def watching(self, step: int) -> bool:
        """True while ``step`` is one of the watched steps and nothing has been decided."""
        return not self.done and step <= WATCHED_STEPS

    def wrap(self, vote: Callable[[Tensor, Tensor], None]) -> Callable[[Tensor, Tensor], None]:
        """``vote`` that also notes whether the voters' packed signs [M, C] differ anywhere."""
        self._differ = False

        def watched(packed: Tensor, out: Tensor) -> None:
            if not self._differ and packed.shape[1] and not bool((packed == packed[:1]).all()):
                self._differ = True
            vote(packed, out)
        return watched

    def end_step(self, gradients_nonzero: bool) -> None:
        """Record the watched step: voters that differ end the watch; identical signs count towards the warning."""
        if self._differ:
            self.done = True
            return
        if not gradients_nonzero:  # zero gradients give identical signs anyway: no evidence
            return
        self._identical_steps += 1
        if self._identical_steps >= WATCHED_STEPS:
            self.done = True
            self.stats.gradients_already_averaged = True
            logger.warning(WARNING, WATCHED_STEPS)
