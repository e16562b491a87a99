"""The example recipe: default hyper-parameters, lr schedule, evaluation, and running a training job.

``launch.train`` (the trainer), ``launch.demo`` and the studies in ``benchmarks/``
share these, so a study trains exactly as the trainer does::

    from launch.recipe import DEFAULT_HYPERPARAMETERS, Session, evaluate, lr_at, run_training

    metrics = run_training(["--optimizer", "distlion", *SMOKE_ARGS], workers=2, out="runs/x")
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from launch.data import validation_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lion guidance (Chen et al. 2023): lr 3-10x smaller than AdamW's and weight decay 3-10x
# larger, because every coordinate of a sign update moves by the full lr. DistLion and
# global Lion here take the scaled step (vote_ema_beta 0.9, docs/optimizer.md, "The scaled step"):
# coordinates whose sign keeps flipping move by ~5% of the lr, so the lr is 2x AdamW's
# (6e-3) with weight decay 0.3 (3x). beta2 = 0.999 instead of Lion's usual 0.99 (a sweep
# of the unscaled step, benchmarks/results/lion_sweep-*.json: with 0.99 the best lr ended
# 7% above AdamW). The embeddings (the token one is also the output layer) take 10x the
# lr (benchmarks/results/lion_gap-*.json). lr 6e-3 beat 4e-3 and 1e-2, and weight decay
# 0.3 beat 0.1, on one process (benchmarks/lion_gap.py, benchmarks/RESULTS.md, convergence).
DEFAULT_HYPERPARAMETERS = {
    "adamw": {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "embedding_lr_scale": 1.0},
    "distlion": {"lr": 6e-3, "weight_decay": 0.3, "betas": (0.9, 0.999), "embedding_lr_scale": 10.0,
                 "vote_ema_beta": 0.9},
    "lion": {"lr": 6e-3, "weight_decay": 0.3, "betas": (0.9, 0.999), "embedding_lr_scale": 10.0,
             "vote_ema_beta": 0.9},
}
# launch.train arguments for a tiny configuration (CI): every code path, a few seconds of compute.
SMOKE_ARGS = ["--steps", "12", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
              "--batch_size", "4", "--eval_interval", "6", "--eval_sequences", "32"]


def lr_at(step: int, args: Any) -> float:
    """Linear warm-up to ``args.lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step.

    ``args`` needs ``lr``, ``steps``, ``warmup_steps`` and ``min_lr_ratio`` (``launch.train``'s arguments).
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class Session:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@torch.no_grad()
def evaluate(module: torch.nn.Module, corpus, args: Any, session: Session) -> float:
    """Mean validation loss over the shared windows, averaged over all ranks' shares.

    ``args`` needs ``eval_sequences``, ``batch_size`` and ``block_size``.
    """
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for x, y in validation_batches(corpus, num_sequences=args.eval_sequences, rank=session.rank,
                                   world_size=session.world_size, batch_size=max(args.batch_size, 16),
                                   block_size=args.block_size):
        _, loss = module(x.to(session.device), y.to(session.device))
        total += torch.tensor([loss.item() * x.numel(), x.numel()], dtype=torch.float64)
    if session.distributed:
        total = total.to(session.device)
        dist.all_reduce(total)
    module.train(was_training)
    return float(total[0] / total[1])


def run_training(train_args: list[str], workers: int, out: str) -> dict:
    """Run ``python -m launch.train`` on ``workers`` local processes with torchrun; return its metrics.

    One worker runs the module directly. Paths in ``train_args`` must be absolute: the
    job runs in the repository root. Raises CalledProcessError when training fails.
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    command = [sys.executable, "-m", "launch.train", *train_args, "--out", out]
    if workers > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"]
    # One thread per worker: workers already outnumber cores, more threads only contend.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env, cwd=REPO)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)
