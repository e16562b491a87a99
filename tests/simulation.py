"""DistLion written from its formulas (docs/design.md §1 and §6), one plain tensor per worker.

The oracle of the multi-process tests: N = M * G ranks, nodes of G consecutive ranks;
node k's gradient is the mean of its ranks' gradients, and the M nodes vote.
"""

from __future__ import annotations

import math

import torch

LR, WD, BETAS = 0.01, 0.1, (0.9, 0.99)
SHAPES = [(33, 7), (7,), (5, 3)]  # 259 coordinates: padding in every bucket


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def _grads(rank: int, step: int, style: str) -> list[torch.Tensor]:
    """Rank-dependent gradients.

    "ties" makes many exact ties and exact zeros; "dyadic" rounds to multiples of 1/256,
    so a node's sum is exact in any order (a reduce-scatter may add in any order);
    "nonzero" adds 2^-(10 + rank) to those: no sum of ranks' gradients is 0, so c is
    never exactly 0 and the zero rule (whose index depends on the layout) never decides.
    """
    gen = torch.Generator().manual_seed(1000 * step + rank)
    grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
    if style == "ties":
        grads = [g.sign() for g in grads]
        grads[1].zero_()  # a parameter nobody updates: c stays exactly 0 on every rank
    elif style == "dyadic":
        grads = [torch.round(g * 256) / 256 for g in grads]
        grads[1][::2] = 0  # some coordinates with c == 0 on every node
    elif style == "nonzero":
        grads = [torch.round(g * 256) / 256 + 2.0 ** -(10 + rank) for g in grads]
    return grads


def _node_gradient(node: int, ranks_per_node: int, step: int, style: str) -> torch.Tensor:
    flat = [torch.cat([t.reshape(-1) for t in _grads(node * ranks_per_node + j, step, style)])
            for j in range(ranks_per_node)]
    total = flat[0]
    for other in flat[1:]:
        total = total + other
    return total / ranks_per_node if ranks_per_node > 1 else total


def simulate(world_size: int, steps: int, style: str, vote: str = "majority",
             vote_ema_beta: float | None = None, ranks_per_node: int = 1,
             bucket_sizes: list[int] | None = None) -> list[list[torch.Tensor]]:
    """Simulate ``world_size`` ranks in nodes of ``ranks_per_node``; one list of parameters per step.

    With ``vote_ema_beta`` the voted step is scaled by the squared, bias-corrected EMA of
    the voted steps (DistLion's docstring). ``bucket_sizes``: the parameters' coordinates
    per bucket, in order (default one bucket); the zero rule counts from each bucket's start.
    """
    voters = world_size // ranks_per_node
    x = torch.cat([p.detach().reshape(-1) for p in _params()])
    d = x.numel()
    m = [torch.zeros(d) for _ in range(voters)]
    ema = torch.zeros(d)
    index_in_bucket = torch.cat([torch.arange(n) for n in (bucket_sizes or [d])])
    history = []
    for step in range(1, steps + 1):
        signs = []
        for i in range(voters):
            g = _node_gradient(i, ranks_per_node, step, style)
            c = (m[i] * BETAS[0]).add(g, alpha=1 - BETAS[0])
            zero_sign = torch.where((index_in_bucket + step) % 2 == 0, 1.0, -1.0)
            signs.append(torch.where(c > 0, 1.0, torch.where(c < 0, -1.0, zero_sign)))
            m[i] = (m[i] * BETAS[1]).add(g, alpha=1 - BETAS[1])
        total = torch.stack(signs).sum(0)
        if vote == "majority":
            delta = torch.where(total == 0, signs[step % voters], total.sign())
        else:
            delta = total / voters
        if vote_ema_beta is not None:
            ema = (ema * vote_ema_beta).add(delta, alpha=1 - vote_ema_beta)
            unbiased = ema * (1 / (1 - vote_ema_beta ** step))
            delta = delta * unbiased * unbiased
        x = (x * (1 - LR * WD)).add(delta, alpha=-LR)
        history.append([t.view(shape).clone() for t, shape in zip(x.split([math.prod(s) for s in SHAPES]), SHAPES)])
    return history


def assert_equal_histories(got, expected):
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {step}: max difference {(x - y).abs().max().item()}"
