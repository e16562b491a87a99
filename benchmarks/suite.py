"""Vote quality on tasks nobody tuned for: DistLion against global Lion and AdamW on four local tasks.

Four tasks, every one generated on this machine (nothing is downloaded), each trained
data-parallel on 4 gloo processes with small per-rank batches:

- ``lm``: byte-level GPT (``launch.model``, 2 layers, width 64, context 64) on the
  Python standard library's source (``launch.data``); metric: test loss, nats/byte.
- ``cnn``: a small CNN on noisy oriented gratings (8 orientations, random frequency,
  phase and contrast, Gaussian pixel noise); metric: test accuracy.
- ``tabular``: an MLP on Friedman #1 regression (10 uniform features, 5 of them
  irrelevant, noise sigma 1, targets standardised); metric: test MSE.
- ``teacher``: a student MLP learns a fixed random teacher MLP from noisy labels; the
  optimum is known (the teacher), so the metric is the excess test MSE against the
  teacher's clean outputs (0 at the optimum).

Optimizers: ``adamw`` (gradients averaged by one explicit fp32 all-reduce, then AdamW:
DDP's arithmetic), ``lion_global`` (the same averaged gradients, then plain Lion:
DistLion on a process group of one rank, as ``launch.train`` builds global Lion),
``distlion_majority``, ``distlion_average`` (vote="average"), ``distlion_scaled``
(majority vote with ``vote_ema_beta=0.9``) and ``distlion_2x2`` (``ranks_per_node=2``:
two nodes of two ranks, each node votes as one worker). DistLion's gradients stay
local: it exchanges the signs itself in ``step()``.

Tuning budget, the same for every optimizer: a grid of 3 learning rates (the centre times
1/3, 1, 3) whose centre follows the optimizer's family: AdamW's centre is the task's
``adamw_lr``; Lion's (global Lion and the unscaled DistLion settings) is 5x smaller with
5x the weight decay (Lion guidance, launch/recipe.py: the same lr x decay product); the
scaled step's is 2x AdamW's with 3x its decay (the recipe's demo setting). Betas: AdamW
(0.9, 0.95), Lion (0.9, 0.99). Schedule: linear warm-up over 5% of the steps, then cosine
decay to 10% of the peak (``launch.recipe.lr_at``). Weight decay applies to matrices,
convolution kernels and embeddings, not to biases or LayerNorm gains. For every
(task, optimizer) the lr with the best validation metric (mean over seeds) is chosen,
and the test metric at that lr is reported, mean and sample std over seeds 0, 1, 2.
The seed sets the initial weights and the data order, identical for every optimizer;
the datasets themselves are fixed per task.

Gaps are signed so that positive is worse: for losses and errors the % by which the
mean exceeds the reference's mean, for accuracy the points (of 100) below it.
Communication is bits per parameter and step that a voter (a rank, or a node of
``distlion_2x2``) sends over the slow link, measured by DistLion's ``comm_stats``
(``inter_node_bytes_per_step``); AdamW and global Lion send the fp32 ring all-reduce's
64 * (N - 1) / N (48 at N = 4), the convention of ``distlion.comm.stats``.
``distlion_2x2``'s intra-node bytes (fp32 reduce-scatter and all-gather) are reported
apart. The issue's target, read as: a DistLion setting meets it when its gap to global
Lion is at most 1 point (accuracy) or 5% (loss, error), its gap to AdamW at most 2
points (accuracy) or 2% (loss, error), and its slow-link bits at most 1.5x the majority
vote's.

One launch (torchrun, 4 local processes, bounded by a timeout) per (task, seed) trains
every optimizer at every lr in sequence, re-seeding the model and the data order for
each; rank 0 prints a line per finished run::

    python -m benchmarks.suite                                   # 4 tasks x 6 optimizers x 3 lrs x 3 seeds
    python -m benchmarks.suite --tasks cnn tabular --seeds 0 --optimizers adamw distlion_majority
    python -m benchmarks.suite --smoke                           # tiny: 1 seed, 2 ranks, 1 lr, 10 steps
    python -m benchmarks.suite --combine A.json B.json --tag both  # no training: one summary of both

Writes ``benchmarks/results/suite-DATE.json`` (every run, the chosen lrs, the summary)
and ``suite-DATE.png`` (per task: mean +- std per optimizer, and test metric against lr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from benchmarks import harness
from distlion import DistLion
from launch.data import Corpus, load_corpus, train_batch, validation_batches
from launch.model import GPT, GPTConfig
from launch.recipe import lr_at

LR_GRID = (1 / 3, 1.0, 3.0)  # multiples of a family's centre lr: 3 points for every optimizer
WARMUP_FRACTION, MIN_LR_RATIO = 0.05, 0.1
ADAMW_BETAS, LION_BETAS = (0.9, 0.95), (0.9, 0.99)
# Target of the issue: gap to global Lion, gap to AdamW (accuracy: points; else %), bytes vs majority.
TARGET_VS_LION = {"points": 1.0, "percent": 5.0}
TARGET_VS_ADAMW = {"points": 2.0, "percent": 2.0}
TARGET_BYTES_VS_MAJORITY = 1.5


# ------------------------------------------------------------------------------ optimizers

@dataclass(frozen=True)
class OptimizerSpec:
    """How one optimizer runs: its family sets the lr and decay multiples of AdamW's."""

    family: str  # "adamw", "lion" or "scaled"
    averaged: bool  # gradients all-reduced (DDP's arithmetic) before the step
    vote: str = "majority"
    vote_ema_beta: float | None = None
    ranks_per_node: int = 1
    momentum_sync_every: int | None = None
    k: str = "sign"


OPTIMIZERS = {
    "adamw": OptimizerSpec("adamw", averaged=True),
    "lion_global": OptimizerSpec("lion", averaged=True),
    "distlion_majority": OptimizerSpec("lion", averaged=False),
    "distlion_average": OptimizerSpec("lion", averaged=False, vote="average"),
    "distlion_scaled": OptimizerSpec("scaled", averaged=False, vote_ema_beta=0.9),
    "distlion_2x2": OptimizerSpec("lion", averaged=False, ranks_per_node=2),
    # candidates to close the vote's gap: momenta averaged every K steps (24/K bits per parameter per
    # step at N = 4 on top of the vote's 1.5; also with nodes), and Lion-K's ternary rules (2 bits per coordinate)
    "distlion_msync8": OptimizerSpec("lion", averaged=False, momentum_sync_every=8),
    "distlion_msync16": OptimizerSpec("lion", averaged=False, momentum_sync_every=16),
    "distlion_msync32": OptimizerSpec("lion", averaged=False, momentum_sync_every=32),
    "distlion_msync64": OptimizerSpec("lion", averaged=False, momentum_sync_every=64),
    "distlion_2x2_msync32": OptimizerSpec("lion", averaged=False, ranks_per_node=2, momentum_sync_every=32),
    "distlion_dead_zone": OptimizerSpec("lion", averaged=False, k="dead_zone"),
    "distlion_top": OptimizerSpec("lion", averaged=False, k="top"),
}
# what a run without --optimizers trains (the candidates are asked for by name)
DEFAULT_OPTIMIZERS = ("adamw", "lion_global", "distlion_majority", "distlion_average", "distlion_scaled",
                      "distlion_2x2")
# family -> (lr multiple, weight decay multiple) of AdamW's
FAMILY_SCALES = {"adamw": (1.0, 1.0), "lion": (1 / 5, 5.0), "scaled": (2.0, 3.0)}
REFERENCES = ("lion_global", "adamw")
MAJORITY = "distlion_majority"


def lr_grid(adamw_lr: float, family: str, multiples: tuple[float, ...] = LR_GRID) -> list[float]:
    """The family's lrs for a task whose AdamW centre is ``adamw_lr``: its centre times ``multiples``."""
    centre = adamw_lr * FAMILY_SCALES[family][0]
    return [centre * m for m in multiples]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices, kernels and embeddings decay; biases and norm gains do not."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float, weight_decay: float,
                    lion_group: dist.ProcessGroup) -> torch.optim.Optimizer:
    groups = decay_groups(model, weight_decay * FAMILY_SCALES[spec.family][1])
    if spec.family == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, foreach=True)
    if spec.averaged:  # global Lion: the averaged gradient, the same Lion step alone on every rank
        return DistLion(groups, lr=lr, betas=LION_BETAS, process_group=lion_group, ranks_per_node=1)
    return DistLion(groups, lr=lr, betas=LION_BETAS, vote=spec.vote, vote_ema_beta=spec.vote_ema_beta,
                    ranks_per_node=spec.ranks_per_node, momentum_sync_every=spec.momentum_sync_every, k=spec.k)


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """DDP's arithmetic in one collective: all-reduce the flattened fp32 gradients, divide by N."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def ring_allreduce_bits(world_size: int) -> float:
    """Bits per parameter one rank sends in an fp32 ring all-reduce: 64 * (N - 1) / N."""
    return 64.0 * (world_size - 1) / world_size


# ---------------------------------------------------------------------------------- tasks

@dataclass
class Split:
    x: Tensor
    y: Tensor


@dataclass
class Data:
    """A task's fixed data: train, validation and test splits; batches depend on (seed, step, rank) only."""

    train: Split
    val: Split
    test: Split
    corpus: Corpus | None = None  # lm: train batches are windows of its text ...
    block_size: int = 0  # ... this long

    def batch(self, *, step: int, rank: int, world_size: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
        if self.corpus is not None:
            return train_batch(self.corpus, step=step, rank=rank, world_size=world_size, batch_size=batch_size,
                               block_size=self.block_size, seed=seed)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step * world_size + rank)
        index = torch.randint(0, self.train.x.shape[0], (batch_size,), generator=generator)
        return self.train.x[index], self.train.y[index]


@dataclass(frozen=True)
class Task:
    """A model, its data, its loss, and the metric reported (``sum_metric`` sums it over a split's items)."""

    name: str
    metric: str
    higher_is_better: bool
    steps: int
    batch_size: int  # per rank
    adamw_lr: float
    weight_decay: float  # AdamW's
    make_data: Callable[[bool], Data]
    build_model: Callable[[bool], nn.Module]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    sum_metric: Callable[[nn.Module, Tensor, Tensor], float]  # over the items given

    @property
    def gap_unit(self) -> str:
        return "points" if self.higher_is_better else "percent"


def _split(x: Tensor, y: Tensor, n_train: int, n_val: int) -> tuple[Split, Split, Split]:
    return (Split(x[:n_train], y[:n_train]), Split(x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
            Split(x[n_train + n_val:], y[n_train + n_val:]))


# lm -------------------------------------------------------------------------------------

LM_CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)
LM_SMOKE_CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


def lm_data(smoke: bool) -> Data:
    """The stdlib corpus; its validation text split in halves: windows of the first validate, of the second test."""
    corpus = load_corpus()
    block = (LM_SMOKE_CONFIG if smoke else LM_CONFIG).block_size
    sequences = 16 if smoke else 128
    half = corpus.val.numel() // 2
    splits = []
    for text in (corpus.val[:half], corpus.val[half:]):
        windows = validation_batches(Corpus(corpus.train, text, corpus.source), num_sequences=sequences, rank=0,
                                     world_size=1, batch_size=sequences, block_size=block)
        splits.append(Split(*next(iter(windows))))
    return Data(Split(corpus.train, corpus.train), splits[0], splits[1], corpus=corpus, block_size=block)


def lm_model(smoke: bool) -> nn.Module:
    return GPT(LM_SMOKE_CONFIG if smoke else LM_CONFIG)


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model(x, y)[1]


def lm_sum_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Sum over sequences of the mean loss per byte (so the metric is the mean over sequences)."""
    return lm_loss(model, x, y).item() * x.shape[0]


# cnn ------------------------------------------------------------------------------------

GRATING_CLASSES, IMAGE_SIZE = 8, 16


def gratings(n: int, generator: torch.Generator, noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """Noisy oriented gratings [n, 1, 16, 16]; the label is one of 8 orientations in [0, pi)."""
    labels = torch.randint(0, GRATING_CLASSES, (n,), generator=generator)
    angle = (labels.float() + 0.3 * (torch.rand(n, generator=generator) - 0.5)) * math.pi / GRATING_CLASSES
    frequency = 0.5 + 0.6 * torch.rand(n, generator=generator)  # radians per pixel
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    contrast = 0.4 + 0.8 * torch.rand(n, generator=generator)
    axis = torch.arange(IMAGE_SIZE, dtype=torch.float32) - (IMAGE_SIZE - 1) / 2
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    along = cols * torch.cos(angle)[:, None, None] + rows * torch.sin(angle)[:, None, None]
    images = contrast[:, None, None] * torch.sin(frequency[:, None, None] * along + phase[:, None, None])
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.unsqueeze(1), labels


def cnn_data(smoke: bool) -> Data:
    n_train, n_val, n_test = (256, 64, 64) if smoke else (8192, 1024, 2048)
    x, y = gratings(n_train + n_val + n_test, torch.Generator().manual_seed(12345))
    return Data(*_split(x, y, n_train, n_val))


def cnn_model(smoke: bool) -> nn.Module:
    width = 4 if smoke else 16
    return nn.Sequential(
        nn.Conv2d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, GRATING_CLASSES))


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def correct(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(dim=1) == y).sum().item()


# tabular --------------------------------------------------------------------------------

def friedman1(n: int, generator: torch.Generator, noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """Friedman #1: y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5 + noise; x6..x10 are irrelevant."""
    x = torch.rand(n, 10, generator=generator)
    y = (10 * torch.sin(math.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
         + noise * torch.randn(n, generator=generator))
    return x, y


def tabular_data(smoke: bool) -> Data:
    n_train, n_val, n_test = (256, 64, 64) if smoke else (4096, 1024, 4096)
    x, y = friedman1(n_train + n_val + n_test, torch.Generator().manual_seed(23456))
    mean, std = y[:n_train].mean(), y[:n_train].std()  # statistics of the train split only
    return Data(*_split((x - 0.5) / 0.29, (y - mean) / std, n_train, n_val))


def mlp(inputs: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def tabular_model(smoke: bool) -> nn.Module:
    return mlp(10, 16 if smoke else 128, 2)


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x).squeeze(1), y)


def sum_squared_error(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return ((model(x).squeeze(1) - y) ** 2).sum().item()


# teacher --------------------------------------------------------------------------------

TEACHER_INPUTS, LABEL_NOISE = 20, 0.5


def teacher_data(smoke: bool) -> Data:
    """Gaussian inputs, a fixed random tanh teacher; train labels noisy, validation and test labels clean."""
    n_train, n_val, n_test = (256, 64, 64) if smoke else (8192, 1024, 4096)
    generator = torch.Generator().manual_seed(34567)
    teacher = [torch.randn(TEACHER_INPUTS, 32, generator=generator) / math.sqrt(TEACHER_INPUTS),
               torch.randn(32, 32, generator=generator) / math.sqrt(32), torch.randn(32, generator=generator)]
    x = torch.randn(n_train + n_val + n_test, TEACHER_INPUTS, generator=generator)
    clean = torch.tanh(torch.tanh(x @ teacher[0]) @ teacher[1]) @ teacher[2] / math.sqrt(32)
    clean = clean / clean.std()
    noisy = clean + LABEL_NOISE * torch.randn(clean.shape, generator=generator)
    train, val, test = _split(x, clean, n_train, n_val)
    return Data(Split(train.x, noisy[:n_train]), val, test)


def teacher_model(smoke: bool) -> nn.Module:
    return mlp(TEACHER_INPUTS, 16 if smoke else 128, 2)


TASKS = {
    "lm": Task("lm", "test loss (nats/byte)", False, steps=300, batch_size=4, adamw_lr=3e-3, weight_decay=0.1,
               make_data=lm_data, build_model=lm_model, loss=lm_loss, sum_metric=lm_sum_loss),
    "cnn": Task("cnn", "test accuracy (%)", True, steps=300, batch_size=16, adamw_lr=3e-3, weight_decay=0.05,
                make_data=cnn_data, build_model=cnn_model, loss=cross_entropy, sum_metric=correct),
    "tabular": Task("tabular", "test MSE (standardised)", False, steps=300, batch_size=16, adamw_lr=3e-3,
                    weight_decay=0.01, make_data=tabular_data, build_model=tabular_model, loss=mse,
                    sum_metric=sum_squared_error),
    "teacher": Task("teacher", "excess test MSE", False, steps=300, batch_size=16, adamw_lr=3e-3,
                    weight_decay=0.01, make_data=teacher_data, build_model=teacher_model, loss=mse,
                    sum_metric=sum_squared_error),
}


# -------------------------------------------------------------------------------- workers

@torch.no_grad()
def evaluate(task: Task, model: nn.Module, split: Split, rank: int, world_size: int) -> float:
    """The task's metric on ``split``: every rank scores every N-th item (replicas are identical), summed."""
    model.eval()
    x, y = split.x[rank::world_size], split.y[rank::world_size]
    totals = torch.tensor([0.0, float(x.shape[0])], dtype=torch.float64)
    for lo in range(0, x.shape[0], 256):
        totals[0] += task.sum_metric(model, x[lo:lo + 256], y[lo:lo + 256])
    dist.all_reduce(totals)
    model.train()
    value = float(totals[0] / totals[1])
    return 100.0 * value if task.higher_is_better else value  # accuracy in %


def train_run(task: Task, data: Data, name: str, lr: float, *, seed: int, steps: int, batch_size: int,
              smoke: bool, lion_group: dist.ProcessGroup) -> dict:
    """Train one (optimizer, lr) from the seed's initial weights on the seed's batches; return its metrics."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    spec = OPTIMIZERS[name]
    torch.manual_seed(seed)  # the same initial weights for every optimizer and rank
    model = task.build_model(smoke)
    params = list(model.parameters())
    optimizer = build_optimizer(spec, model, lr, task.weight_decay, lion_group)
    schedule = SimpleNamespace(lr=lr, steps=steps, warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
                               min_lr_ratio=MIN_LR_RATIO)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        x, y = data.batch(step=step, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed)
        loss = task.loss(model, x, y)
        loss.backward()
        if spec.averaged:
            average_gradients(params, world_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        losses.append(loss.item())
    run = {"task": task.name, "optimizer": name, "lr": lr, "seed": seed, "steps": steps,
           "train_loss_last_10pct": statistics.mean(losses[-max(1, steps // 10):]),
           "val": evaluate(task, model, data.val, rank, world_size),
           "test": evaluate(task, model, data.test, rank, world_size),
           "num_parameters": sum(p.numel() for p in params), "wall_s": time.perf_counter() - start}
    return {**run, **communication(spec, optimizer, run["num_parameters"], world_size)}


def communication(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, num_parameters: int,
                  world_size: int) -> dict:
    """Bits per parameter and step over the slow link (per voter) and inside nodes (per rank)."""
    if spec.averaged:
        return {"bits_per_param_step": ring_allreduce_bits(world_size), "intra_node_bits_per_param_step": 0.0,
                "bits_source": "fp32 ring all-reduce, 64*(N-1)/N"}
    stats = optimizer.comm_stats
    intra = 8 * stats.intra_node_bytes_sent / stats.steps / num_parameters if stats.steps else 0.0
    return {"bits_per_param_step": 8 * stats.inter_node_bytes_per_step / num_parameters,
            "intra_node_bits_per_param_step": intra, "bits_source": "comm_stats.inter_node_bytes_per_step",
            "compression": stats.compression, "skipped_steps": stats.skipped_steps}


def worker(args: argparse.Namespace) -> NoReturn:
    """Train every task x optimizer x lr of ``args`` for ``args.seed``; rank 0 writes the runs; every rank exits."""
    rank, world_size = harness.join_group()
    lion_group, _ = dist.new_subgroups(group_size=1)
    runs = []
    for task_name in args.tasks:
        task = TASKS[task_name]
        data = task.make_data(args.smoke)
        steps = args.steps or task.steps
        batch_size = 2 if args.smoke else task.batch_size
        for name in args.optimizers:
            for lr in lr_grid(task.adamw_lr, OPTIMIZERS[name].family, tuple(args.lr_multiples)):
                run = train_run(task, data, name, lr, seed=args.seed, steps=steps, batch_size=batch_size,
                                smoke=args.smoke, lion_group=lion_group)
                runs.append(run)
                if rank == 0:
                    print(f"  {task_name} seed {args.seed} {name:18s} lr {lr:.2e}: val {run['val']:.4f} "
                          f"test {run['test']:.4f} ({run['wall_s']:.1f} s)", flush=True)
    harness.finish_worker(args.result, {"runs": runs})


# --------------------------------------------------------------------------- orchestration

def gap(task: Task, value: float, reference: float) -> float:
    """Positive is worse: % above the reference for losses, points below it for accuracy (in %)."""
    if task.higher_is_better:
        return reference - value
    return 100.0 * (value / reference - 1.0)


def choose(task: Task, runs: list[dict]) -> float:
    """The lr with the best mean validation metric over seeds (a non-finite one is the worst)."""
    by_lr: dict[float, list[float]] = {}
    for run in runs:
        by_lr.setdefault(run["lr"], []).append(run["val"])

    def badness(lr: float) -> float:
        mean = statistics.mean(by_lr[lr])
        if not math.isfinite(mean):
            return math.inf
        return -mean if task.higher_is_better else mean
    return min(by_lr, key=badness)


def summarize(task: Task, runs: list[dict]) -> dict[str, dict]:
    """Per optimizer: chosen lr, test mean and std over seeds, bits, then gaps and targets."""
    table: dict[str, dict] = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        lr = choose(task, mine)
        tests = [r["test"] for r in mine if r["lr"] == lr]
        at_lr = [r for r in mine if r["lr"] == lr]
        table[name] = {"lr": lr, "test_mean": statistics.mean(tests),
                       "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "n": len(tests),
                       "val_mean": statistics.mean(r["val"] for r in at_lr),
                       "bits_per_param_step": statistics.mean(r["bits_per_param_step"] for r in at_lr),
                       "intra_node_bits_per_param_step": statistics.mean(
                           r["intra_node_bits_per_param_step"] for r in at_lr)}
    for name, row in table.items():
        for reference in REFERENCES:
            if reference in table and name != reference:
                row[f"gap_vs_{reference}"] = gap(task, row["test_mean"], table[reference]["test_mean"])
        if name.startswith("distlion") and all(f"gap_vs_{r}" in row for r in REFERENCES) and MAJORITY in table:
            unit = task.gap_unit
            bytes_ratio = row["bits_per_param_step"] / table[MAJORITY]["bits_per_param_step"]
            row["target"] = {"vs_lion_global": row["gap_vs_lion_global"] <= TARGET_VS_LION[unit],
                             "vs_adamw": row["gap_vs_adamw"] <= TARGET_VS_ADAMW[unit],
                             "bytes_vs_majority": bytes_ratio,
                             "bytes": bytes_ratio <= TARGET_BYTES_VS_MAJORITY}
            row["target"]["met"] = all(row["target"][k] for k in ("vs_lion_global", "vs_adamw", "bytes"))
    return table


def print_table(task: Task, table: dict[str, dict]) -> None:
    unit = "pt" if task.higher_is_better else "%"
    print(f"\n{task.name}: {task.metric}, lr chosen on validation")
    print(f"{'optimizer':18s} {'lr':>8} {'mean':>9} {'std':>8} {'vs lion':>9} {'vs adamw':>9} {'bits':>6} target")
    for name, row in table.items():
        gaps = [f"{row[k]:+.2f}{unit}" if k in row else "" for k in ("gap_vs_lion_global", "gap_vs_adamw")]
        target = "" if "target" not in row else ("met" if row["target"]["met"] else "missed")
        print(f"{name:18s} {row['lr']:8.1e} {row['test_mean']:9.4f} {row['test_std']:8.4f} {gaps[0]:>9} "
              f"{gaps[1]:>9} {row['bits_per_param_step']:6.2f} {target}")


def plot(tasks: list[Task], runs: list[dict], tables: dict[str, dict], path: str) -> None:
    """Per task: bars of mean +- std at the chosen lr (top), test metric mean +- std against lr (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7.5), squeeze=False)
    for column, task in enumerate(tasks):
        table = tables[task.name]
        names = list(table)
        bars = axes[0][column]
        bars.bar(range(len(names)), [table[n]["test_mean"] for n in names],
                 yerr=[table[n]["test_std"] for n in names], capsize=3, color=[f"C{i}" for i in range(len(names))])
        bars.set_xticks(range(len(names)), [n.replace("distlion_", "dl_") for n in names], rotation=45,
                        ha="right", fontsize=8)
        low = min(table[n]["test_mean"] - table[n]["test_std"] for n in names)
        high = max(table[n]["test_mean"] + table[n]["test_std"] for n in names)
        bars.set_ylim(low - 0.15 * (high - low + 1e-9), high + 0.15 * (high - low + 1e-9))
        bars.set_title(f"{task.name}: {task.metric}", fontsize=9)
        curves = axes[1][column]
        for i, name in enumerate(names):
            lrs = sorted({r["lr"] for r in runs if r["task"] == task.name and r["optimizer"] == name})
            values = [[r["test"] for r in runs if r["task"] == task.name and r["optimizer"] == name and r["lr"] == lr]
                      for lr in lrs]
            curves.errorbar(lrs, [statistics.mean(v) for v in values],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
                            marker="o", capsize=2, color=f"C{i}", label=name)
        curves.set_xscale("log")
        curves.set_xlabel("peak lr")
        curves.set_ylabel(task.metric, fontsize=8)
    axes[1][0].legend(fontsize=7)
    fig.suptitle("DistLion vs global Lion vs AdamW, 4 gloo ranks: mean ± std over seeds at the lr chosen on "
                 "validation (top), test metric against lr (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", choices=sorted(TASKS), nargs="+", default=list(TASKS))
    parser.add_argument("--optimizers", choices=sorted(OPTIMIZERS), nargs="+", default=list(DEFAULT_OPTIMIZERS))
    parser.add_argument("--with_runs", default=None, metavar="JSON",
                        help="a suite results file whose runs (same tasks and seeds) join this run's in the tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world_size", type=harness.positive_int, default=4)
    parser.add_argument("--steps", type=harness.positive_int, default=None, help="default: each task's own")
    parser.add_argument("--lr_multiples", type=float, nargs="+", default=list(LR_GRID), metavar="M",
                        help="the lr grid: multiples of each family's centre lr (the same for every optimizer)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="train nothing: summarize the runs of these results files together (e.g. seeds 0-2 "
                             "and 3-5 of the same world size; a later file's run of the same task, optimizer, "
                             "lr and seed replaces an earlier one's)")
    parser.add_argument("--tag", default=None, help="results file suite-TAG-DATE.json, for a non-default run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch (task, seed)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the worker's
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke and not args.worker:
        args.seeds, args.world_size, args.lr_multiples, args.timeout = args.seeds[:1], 2, [1.0], 50.0
        args.steps = args.steps or 10
        if not any(o.startswith("distlion") for o in args.optimizers):
            parser.error("--smoke needs a DistLion optimizer among --optimizers")
        if args.optimizers == list(DEFAULT_OPTIMIZERS):  # two per task, one of them DistLion
            args.optimizers = ["adamw", MAJORITY]
    if any(OPTIMIZERS[o].ranks_per_node > 1 for o in args.optimizers) and args.world_size % 2:
        parser.error(f"--world_size {args.world_size}: distlion_2x2 needs an even number of ranks (nodes of 2)")
    return args


def launch(args: argparse.Namespace, tasks: list[str], seed: int) -> list[dict]:
    """One torchrun launch trains every optimizer x lr of ``tasks`` for ``seed``; return its runs."""
    worker_args = ["--tasks", *tasks, "--optimizers", *args.optimizers, "--seed", str(seed),
                   "--lr_multiples", *map(str, args.lr_multiples), *(["--smoke"] if args.smoke else []),
                   *(["--steps", str(args.steps)] if args.steps else [])]
    return harness.launch_local(__spec__.name, worker_args, args.world_size, args.timeout)["runs"]


def earlier_runs(path: str, args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """The runs of ``path`` for this run's tasks and seeds, of optimizers this run did not train."""
    with open(path) as f:
        earlier = json.load(f)
    if earlier["settings"]["lr_grid_multiples"] != args.lr_multiples:
        raise SystemExit(f"--with_runs {path}: its lr grid {earlier['settings']['lr_grid_multiples']} differs from "
                         f"this run's {args.lr_multiples}; compare runs of the same grid")
    trained = {r["optimizer"] for r in runs}
    kept = [r for r in earlier["runs"] if r["task"] in args.tasks and r["seed"] in args.seeds
            and r["optimizer"] not in trained]
    missing = [(t, s) for t in args.tasks for s in args.seeds if not any(
        r["task"] == t and r["seed"] == s for r in kept)]
    if missing:
        raise SystemExit(f"--with_runs {path} has no runs for (task, seed) {missing}; run those here instead")
    print(f"with {len(kept)} runs of {path}", flush=True)
    return kept


def combined_runs(args: argparse.Namespace) -> list[dict]:
    """The runs of ``args.combine``'s files for this run's tasks and optimizers (their seeds become
    ``args.seeds``); the files must share the world size and lr grid."""
    by_key: dict[tuple, dict] = {}
    for path in args.combine:
        with open(path) as f:
            earlier = json.load(f)
        settings = earlier["settings"]
        if settings["world_size"] != args.world_size or settings["lr_grid_multiples"] != args.lr_multiples:
            raise SystemExit(f"--combine {path}: world size {settings['world_size']} and lr grid "
                             f"{settings['lr_grid_multiples']} differ from this run's {args.world_size} and "
                             f"{args.lr_multiples}; pass --world_size (and --lr_multiples) to match")
        for run in earlier["runs"]:
            if run["task"] in args.tasks and run["optimizer"] in args.optimizers:
                by_key[(run["task"], run["optimizer"], run["lr"], run["seed"])] = run
    runs = list(by_key.values())
    args.seeds = sorted({r["seed"] for r in runs})
    print(f"combining {len(runs)} runs of {len(args.combine)} files, seeds {args.seeds}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)  # ends the process
    # The smoke run is one launch for every task: process start-up is most of its time.
    launches = [(args.tasks, s) for s in args.seeds] if args.smoke else \
        [([t], s) for t in args.tasks for s in args.seeds]
    runs: list[dict] = []
    start = time.perf_counter()
    if args.combine:
        launches, runs = [], combined_runs(args)
    for tasks, seed in launches:
        print(f"{'+'.join(tasks)} seed {seed}: {args.world_size} ranks ...", flush=True)
        runs += launch(args, tasks, seed)
        print(f"{'+'.join(tasks)} seed {seed} done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    elapsed = time.perf_counter() - start
    if args.with_runs:
        runs = earlier_runs(args.with_runs, args, runs) + runs

    tasks = [TASKS[t] for t in args.tasks]
    tables = {t.name: summarize(t, [r for r in runs if r["task"] == t.name]) for t in tasks}
    for task in tasks:
        print_table(task, tables[task.name])
    print(f"({elapsed:.0f} s)")
    settings = {
        "world_size": args.world_size, "seeds": args.seeds, "lr_grid_multiples": args.lr_multiples,
        "family_lr_and_decay_multiples_of_adamw": FAMILY_SCALES,
        "betas": {"adamw": ADAMW_BETAS, "lion": LION_BETAS},
        "schedule": f"linear warm-up {WARMUP_FRACTION:.0%} of steps, cosine to {MIN_LR_RATIO} x peak",
        "targets": {"vs_lion_global": TARGET_VS_LION, "vs_adamw": TARGET_VS_ADAMW,
                    "bytes_vs_majority": TARGET_BYTES_VS_MAJORITY},
        "optimizers": {o: vars(OPTIMIZERS[o]) for o in dict.fromkeys(r["optimizer"] for r in runs)},
        "with_runs": args.with_runs and os.path.basename(args.with_runs),
        "combined": args.combine and [os.path.basename(path) for path in args.combine],
        "tasks": {t.name: {"metric": t.metric, "higher_is_better": t.higher_is_better,
                           "steps": args.steps or t.steps, "batch_size_per_rank": 2 if args.smoke else t.batch_size,
                           "adamw_lr": t.adamw_lr, "adamw_weight_decay": t.weight_decay,
                           "num_parameters": next(r["num_parameters"] for r in runs if r["task"] == t.name)}
                  for t in tasks},
        "bits_convention": "bits per parameter per step a voter (rank; node of distlion_2x2) sends over the "
                           "slow link; adamw and lion_global: fp32 ring all-reduce 64*(N-1)/N",
        "gap_convention": "positive is worse: % above the reference (loss, error), points below it (accuracy)",
    }
    payload = {"settings": settings, "runs": runs,
               "chosen_lr": {t: {o: row["lr"] for o, row in table.items()} for t, table in tables.items()},
               "summary": tables, "wall_time_s": elapsed}
    path = harness.write_results(f"suite-{args.tag}" if args.tag else "suite", payload, args.out, args.smoke)
    plot(tasks, runs, tables, path[:-len(".json")] + ".png")
    print(f"plot: {path[:-len('.json')]}.png")
    return payload


if __name__ == "__main__":
    main()
