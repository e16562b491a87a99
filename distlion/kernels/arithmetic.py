"""The scalar and elementwise formulas every kernel backend shares, in one place.

The reference and the fast backends all import these, so the step sizes of the average
vote and the bias correction of the scaled step are computed one way everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bias_correction(beta: float, step: int) -> float:
    """Return 1 / (1 - beta**step): what the EMA of ``step`` votes, started at zero, is multiplied by.

    Example: ``bias_correction(0.5, 2)`` is 4/3.
    """
    return 1.0 / (1.0 - beta ** step)


def average_steps(voters: int) -> Tensor:
    """Return the step direction (2k - N) / N for k = 0..N positive votes of N voters, in fp32.

    Divided on the CPU with a tensor divisor: a true fp32 division on every device (a GPU
    kernel dividing by a Python scalar multiplies by the rounded reciprocal instead).
    ``average_steps(1)`` is [-1, +1], the majority vote's step.

    Example: ``average_steps(4)`` is [-1, -0.5, 0, 0.5, 1].
    """
    k = torch.arange(voters + 1, dtype=torch.float32)
    return (2 * k - voters) / torch.tensor(float(voters))


def scaled_step(direction: Tensor, vote_ema: Tensor, *, beta: float, step: int) -> Tensor:
    """Update ``vote_ema`` in place with ``direction`` (fp32) and return the scaled step ``s * h * h``.

    vote_ema <- fp32(vote_ema)*beta + s*(1-beta) (one fma); h = vote_ema * bias_correction(beta, step).
    Coordinates whose vote keeps its sign step by up to the full lr, those whose vote flips
    by much less.
    """
    ema = (vote_ema.float() * beta).add(direction, alpha=1.0 - beta)
    vote_ema.copy_(ema)
    unbiased = ema * bias_correction(beta, step)
    return direction * unbiased * unbiased
