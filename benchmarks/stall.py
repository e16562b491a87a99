"""Why the majority vote falls behind global Lion: momentum spread, ties and flips, measured every step.

The hypothesis under test: under the vote each voter's momentum follows its own gradients
only, so the voters' momenta drift apart; where they disagree the vote ties (2-2 at N = 4)
and the tie goes to a rotating voter (``distlion.vote``: voter ``step % N`` decides), so a
coordinate steps back and forth instead of moving, and a plateau that global Lion leaves
holds the vote. Momentum sync (``momentum_sync_every``) resets the spread every K steps.

Task (default ``product``, every number generated here): x ~ N(0, I_20), clean target
x1*x2 + 0.5*x3 standardised on the train split; train labels carry N(0, 0.1^2) noise,
validation and test labels are clean (metric: test MSE of the clean target). A GELU MLP
20-32-32-1 (1,761 parameters) learns the product (80% of the target's variance) slowly:
at the centre lr the validation MSE is still 0.6-0.75 after 100 of 300 steps, and when it
comes down depends on the seed. ``--task tabular`` / ``teacher`` train the suite's tasks
instead (``benchmarks.suite``).

Training follows the suite (``benchmarks.suite``): 4 gloo ranks, each its own batch of
``--batch_size`` rows per step (``Data.batch``: keyed by seed, step and rank), Lion betas
(0.9, 0.99), decay on matrices only (5x the task's AdamW decay), lr grid 1/3, 1, 3 times
the Lion centre (AdamW's lr / 5; ``product``: AdamW 1e-2, so 6.7e-4, 2e-3, 6e-3),
linear warm-up over 5% of the steps then cosine to 10%. The settings:

- ``majority``: the vote alone (``momentum_sync_every=None``), gradients stay local, the 4 signs are voted;
- ``lion_global``: gradients averaged (fp32 all-reduce), then DistLion on a process group
  of one rank: plain Lion, the same on every rank (the suite's ``lion_global``);
- ``msync32``, ``msync16``: ``momentum_sync_every=32`` / ``16``;
- ``tie_sync``: a cheaper sync prototyped here: the voters' momenta are averaged (DistLion's
  own bf16 all-reduce, ``optimizer._momentum_sync.sync``) after a step whose tie fraction
  (2-2 votes) exceeds ``--tie_ratio`` times the mean tie fraction of the 4 steps after the
  last sync (equal momenta: the ties that gradient noise alone makes), at most once every
  ``--min_gap`` steps (default 32: never more often than K = 32); the first sync is at step
  ``--min_gap``, as with K = 32 (the momenta start equal, at zero). A voter can count the
  ties it sees (the all-gather exchange gives every voter every sign; the two-phase
  exchange each voter its chunk's), and one scalar all-reduce (8 bytes) makes the rule the
  same on every rank: the prototype computes it from the gathered signs.
- ``tied_sync``: every ``--tied_every`` steps, the momenta are averaged on the coordinates
  whose vote tied at that step only (a bf16 all-reduce of those coordinates; every voter
  knows the same tie mask in the all-gather exchange).
- ``msync1`` (a control, only when named in ``--settings``): ``momentum_sync_every=1``, the
  momenta averaged after every step, so the voters differ only in their gradients: what is
  left of the gap when the momenta cannot drift apart at all.

Diagnostics, every step (diagnostic only: one all-gather of each rank's momentum and local
direction, not part of any setting's bytes). Before ``step()`` each rank reads its momentum
m (``optimizer.state[p]["exp_avg"]``) and its own gradient g (before averaging, for
``lion_global``) and forms its sign s = sign(0.9 m + 0.1 g), as DistLion packs it; the
voted sign D comes from the parameter change, D = sign(x (1 - lr wd) - x_new). Recorded:

- ``spread``: mean over coordinates of the std of m across voters, divided by the mean |m|
  (a ratio of means; 0 when the momenta are equal); ``cosine``: the mean over voter pairs
  of the cosine between their momenta;
- ``tie``: the fraction of coordinates whose N signs sum to 0; ``near_tie``: |sum| <= 2
  (at N = 4: not unanimous, a 3-1 or 2-2 vote); ``tie_repeat``: the fraction tied at this
  step and the previous one;
- ``flip``: the fraction of coordinates whose D differs from the previous step's; ``flip2``:
  the fraction that flipped at both of the last two steps (+-+ or -+-); ``drift10``: the
  mean over coordinates of |sum of the last 10 D| / 10 (1: every step the same way; 0.25:
  coin flips); ``vs_mean``: the fraction where D equals the sign of the voters' mean
  direction (mean of 0.9 m_i + 0.1 g_i), i.e. where the vote agrees with averaging;
- ``loss`` (the ranks' mean train loss), ``param_rms``, and ``synced`` (syncs per step).

For ``lion_global`` the signs are the ranks' signs with the shared momentum and their own
gradients: the disagreement that gradient noise alone makes. Checked every step: D equals
the majority of the gathered signs with DistLion's tie rule (``lion_global``: the sign of
its averaged direction); ``vote_mismatch`` counts the coordinates where it does not (0
expected; coordinates with a zero direction, decided by DistLion's zero rule, are left
out and counted in ``zero_direction``).

Bytes per parameter and step a voter sends: the vote's (``comm_stats``) plus the syncs': a
bf16 ring all-reduce, 2 (N - 1) / N * 2 bytes per averaged coordinate.

A (seed, lr) is a stall when the majority's test metric is at least ``--stall_ratio`` times
global Lion's (at a fixed budget: a run that comes down later counts). Diagnostics are
averaged over windows of the run (steps ``--window``, default the second half: the
"plateau window") and stored per 10 steps::

    python -m benchmarks.stall                       # product, seeds 0-5, 300 steps, 3 lrs, 6 settings
    python -m benchmarks.stall --seeds 0 --settings majority lion_global --lr_multiples 1
    python -m benchmarks.stall --settings msync1 --tag msync1   # the control, same seeds and lrs
    python -m benchmarks.stall --smoke               # tiny: 1 seed, 34 steps, every setting

Writes ``benchmarks/results/stall-DATE.json``: every run (final metrics, val curve,
diagnostics per 10 steps and per window, syncs and bytes), the stalls, and per setting the
lr chosen on validation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmarks import harness, suite
from distlion import DistLion
from distlion.comm import ring_allreduce_bytes
from distlion.momentum_sync import SYNC_DTYPE
from launch.recipe import lr_at

PRODUCT_INPUTS, PRODUCT_NOISE = 20, 0.1
DRIFT_WINDOW = 10  # steps of ``drift10``
RECORD_EVERY = 10  # diagnostics stored as means over this many steps
EVAL_EVERY = 25  # validation metric every this many steps
BASELINE_STEPS = 4  # tie_sync: its baseline is the mean tie fraction of this many steps
FIELDS = ("loss", "spread", "cosine", "tie", "near_tie", "tie_repeat", "flip", "flip2", "drift10", "vs_mean",
          "param_rms", "synced")


# ---------------------------------------------------------------------------------- task

def product_data(smoke: bool) -> suite.Data:
    """Gaussian inputs, clean target x1*x2 + 0.5*x3 (standardised); noisy train labels, clean val and test."""
    n_train, n_val, n_test = (256, 64, 64) if smoke else (4096, 1024, 4096)
    generator = torch.Generator().manual_seed(45678)
    x = torch.randn(n_train + n_val + n_test, PRODUCT_INPUTS, generator=generator)
    clean = x[:, 0] * x[:, 1] + 0.5 * x[:, 2]
    clean = (clean - clean[:n_train].mean()) / clean[:n_train].std()
    noisy = clean + PRODUCT_NOISE * torch.randn(clean.shape, generator=generator)
    train, val, test = suite._split(x, clean, n_train, n_val)
    return suite.Data(suite.Split(train.x, noisy[:n_train]), val, test)


def product_model(smoke: bool) -> nn.Module:
    return suite.mlp(PRODUCT_INPUTS, 8 if smoke else 32, 2)


TASKS = {
    "product": suite.Task("product", "test MSE (clean target)", False, steps=300, batch_size=8, adamw_lr=1e-2,
                          weight_decay=0.01, make_data=product_data, build_model=product_model, loss=suite.mse,
                          sum_metric=suite.sum_squared_error),
    "tabular": suite.TASKS["tabular"],
    "teacher": suite.TASKS["teacher"],
}


# ------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class Setting:
    averaged: bool = False  # global Lion: gradients all-reduced, DistLion on a group of one rank
    momentum_sync_every: int | None = None
    fix: str | None = None  # "tie_sync" or "tied_sync": prototyped here, see the module docstring


SETTINGS = {
    "majority": Setting(),
    "lion_global": Setting(averaged=True),
    "msync32": Setting(momentum_sync_every=32),
    "msync16": Setting(momentum_sync_every=16),
    "tie_sync": Setting(fix="tie_sync"),
    "tied_sync": Setting(fix="tied_sync"),
    # a control, asked for by name: the momenta averaged after every step, so the voters differ in their
    # gradients only (what is left of the gap without any momentum drift)
    "msync1": Setting(momentum_sync_every=1),
}
DEFAULT_SETTINGS = ("majority", "lion_global", "msync32", "msync16", "tie_sync", "tied_sync")
MAJORITY, GLOBAL = "majority", "lion_global"


# --------------------------------------------------------------------------- diagnostics

def momentum_spread(momenta: Tensor) -> tuple[float | None, float | None]:
    """(spread, cosine) of voters' momenta [N, d]: mean_j std_i m_ij / mean_ij |m_ij|, and the mean over pairs
    i < k of cos(m_i, m_k). None where undefined (all momenta zero; a zero momentum has no cosine)."""
    momenta = momenta.double()
    scale = momenta.abs().mean()
    spread = float(momenta.std(dim=0, unbiased=False).mean() / scale) if scale > 0 else None
    norms = momenta.norm(dim=1)
    if momenta.shape[0] < 2 or bool((norms == 0).any()):
        return spread, None
    unit = momenta / norms[:, None]
    gram = unit @ unit.T
    pairs = torch.triu_indices(momenta.shape[0], momenta.shape[0], offset=1)
    return spread, float(gram[pairs[0], pairs[1]].mean())


def majority_vote(signs: Tensor, casting: int) -> Tensor:
    """DistLion's majority of signs [N, d] in {-1, +1}: sign of the sum, a tie goes to voter ``casting``."""
    total = signs.sum(0)
    return torch.where(total == 0, signs[casting], total.sign())


def vote_stats(signs: Tensor, voted: Tensor, history: list[Tensor], previous_tie: Tensor | None) -> dict:
    """Tie and flip fractions of one step: voters' signs [N, d], the voted sign [d], the voted signs of the
    previous steps (newest last, up to ``DRIFT_WINDOW - 1``) and the previous step's tie mask (or None)."""
    voters = signs.shape[0]
    total = signs.sum(0)
    tie = total == 0
    stats = {"tie": float(tie.double().mean()), "near_tie": float((total.abs() <= 2).double().mean()),
             "tie_repeat": None if previous_tie is None else float((tie & previous_tie).double().mean()),
             "flip": None, "flip2": None, "drift10": None}
    if voters % 2:
        stats["tie"] = 0.0  # an odd number of voters cannot tie
    if history:
        flipped = voted != history[-1]
        stats["flip"] = float(flipped.double().mean())
        if len(history) >= 2:
            stats["flip2"] = float((flipped & (history[-1] != history[-2])).double().mean())
        if len(history) >= DRIFT_WINDOW - 1:
            window = torch.stack([*history[-(DRIFT_WINDOW - 1):], voted]).double()
            stats["drift10"] = float((window.sum(0).abs() / DRIFT_WINDOW).mean())
    return stats


def mean_of(values: list) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def binned(series: list, width: int) -> list:
    """Means of ``series`` over consecutive bins of ``width`` steps (None-aware), rounded for the results file."""
    out = []
    for lo in range(0, len(series), width):
        value = mean_of(series[lo:lo + width])
        out.append(None if value is None else round(value, 5))
    return out


# -------------------------------------------------------------------------------- worker

def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def write_flat(values: Tensor, targets: list[Tensor]) -> None:
    offset = 0
    for target in targets:
        target.copy_(values[offset:offset + target.numel()].view_as(target))
        offset += target.numel()


@torch.no_grad()
def sync_coordinates(momenta: list[Tensor], mask: Tensor, voters: int) -> int:
    """Average the voters' momenta on the coordinates of ``mask`` (bf16 all-reduce, as DistLion's sync does);
    return the bytes this rank sends (ring formula)."""
    current = flat(momenta)
    wire = (current[mask] / voters).to(SYNC_DTYPE)
    if wire.numel():
        dist.all_reduce(wire)
    current[mask] = wire.float()
    write_flat(current, momenta)
    return ring_allreduce_bytes(wire.numel() * wire.element_size(), voters)


def train_run(task: suite.Task, data: suite.Data, name: str, lr: float, args: argparse.Namespace,
              lion_group: dist.ProcessGroup) -> dict:
    """Train one (setting, lr) of the seed, measuring every step; return its metrics and diagnostics."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    setting = SETTINGS[name]
    torch.manual_seed(args.seed)
    model = task.build_model(args.smoke)
    params = list(model.parameters())
    groups = suite.decay_groups(model, task.weight_decay * suite.FAMILY_SCALES["lion"][1])
    beta1 = suite.LION_BETAS[0]
    optimizer = DistLion(groups, lr=lr, betas=suite.LION_BETAS, ranks_per_node=1,
                         process_group=lion_group if setting.averaged else None,
                         momentum_sync_every=setting.momentum_sync_every)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    decay = torch.cat([torch.full((p.numel(),), group["weight_decay"]) for group in optimizer.param_groups
                       for p in group["params"]])
    steps = args.steps or task.steps
    schedule = SimpleNamespace(lr=lr, steps=steps, warmup_steps=max(1, round(suite.WARMUP_FRACTION * steps)),
                               min_lr_ratio=suite.MIN_LR_RATIO)
    series: dict[str, list] = {field: [] for field in FIELDS}
    history: deque[Tensor] = deque(maxlen=DRIFT_WINDOW - 1)
    previous_tie = None
    mismatch = zero_direction = syncs = 0
    sync_bytes, last_sync, curve = 0, 0, []
    baseline: list[float] = []  # tie_sync: the tie fractions just after its last sync
    start = time.perf_counter()
    for step in range(steps):
        step_lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        x, y = data.batch(step=step, rank=rank, world_size=world_size, batch_size=args.batch_size, seed=args.seed)
        loss = task.loss(model, x, y)
        loss.backward()
        local_grad = flat([p.grad for p in ordered])
        if setting.averaged:
            suite.average_gradients(params, world_size)
        momentum = flat([optimizer.state[p]["exp_avg"] for p in ordered])
        direction = (momentum * beta1).add(local_grad, alpha=1.0 - beta1)  # as DistLion interpolates, in fp32
        applied = (momentum * beta1).add(flat([p.grad for p in ordered]), alpha=1.0 - beta1)
        before = flat(ordered)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        after = flat(ordered)
        voted = torch.sign(before.double() * (1.0 - step_lr * decay.double()) - after.double())
        # one gather: every rank's momentum, local direction and loss (diagnostics only)
        mine = torch.cat([momentum, direction, loss.detach().reshape(1).float()])
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        table = torch.stack(gathered)
        d = momentum.numel()
        momenta, directions, losses = table[:, :d], table[:, d:2 * d], table[:, 2 * d]
        signs = torch.sign(directions)
        zero = (signs == 0).any(0)
        if setting.averaged:  # plain Lion on the averaged gradient: D = sign(its direction)
            expected = torch.sign(applied).double()
        else:
            expected = majority_vote(signs, optimizer.steps_taken % world_size).double()
        zero_direction += int(zero.sum())
        mismatch += int(((expected != voted) & ~zero).sum())
        spread, cosine = momentum_spread(momenta)
        stats = vote_stats(signs, voted, list(history), previous_tie)
        agree = torch.sign(directions.double().mean(0)) == voted
        tie = signs.sum(0) == 0
        synced = 0
        if last_sync and len(baseline) < BASELINE_STEPS:  # the steps just after a sync: equal momenta
            baseline.append(stats["tie"])
        elif setting.fix == "tie_sync" and step + 1 - last_sync >= args.min_gap and \
                (not last_sync or stats["tie"] > args.tie_ratio * statistics.mean(baseline)):
            sent_before = optimizer.comm_stats.inter_node_bytes_sent
            optimizer._momentum_sync.sync(optimizer.layout.momenta())
            sync_bytes += optimizer.comm_stats.inter_node_bytes_sent - sent_before
            synced, last_sync, baseline = 1, step + 1, []
        elif setting.fix == "tied_sync" and (step + 1) % args.tied_every == 0:
            sync_bytes += sync_coordinates([optimizer.state[p]["exp_avg"] for p in ordered], tie, world_size)
            synced = 1
        elif optimizer._momentum_sync.due(optimizer.steps_taken):
            synced = 1
        syncs += synced
        values = {"loss": float(losses.mean()), "spread": spread, "cosine": cosine, **stats,
                  "vs_mean": float(agree.double().mean()), "param_rms": float(after.double().pow(2).mean().sqrt()),
                  "synced": synced}
        for field in FIELDS:
            series[field].append(values[field])
        history.append(voted)
        previous_tie = tie
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            curve.append([step + 1, round(suite.evaluate(task, model, data.val, rank, world_size), 5)])
    wall = time.perf_counter() - start
    num_parameters = sum(p.numel() for p in params)
    stats = optimizer.comm_stats
    if setting.momentum_sync_every:  # DistLion's syncs, counted in comm_stats as momentum_sync.py counts them
        sync_bytes = syncs * sum(ring_allreduce_bytes(m.numel() * SYNC_DTYPE.itemsize, world_size)
                                 for m in optimizer.layout.momenta())
    sent = stats.inter_node_bytes_sent + (sync_bytes if setting.fix == "tied_sync" else 0)  # the rest is counted
    if setting.averaged:
        bits, sync_bits = suite.ring_allreduce_bits(world_size), 0.0
    else:
        bits, sync_bits = 8 * sent / stats.steps / num_parameters, 8 * sync_bytes / stats.steps / num_parameters
    return {"task": task.name, "setting": name, "lr": lr, "seed": args.seed, "steps": steps,
            "val": suite.evaluate(task, model, data.val, rank, world_size),
            "test": suite.evaluate(task, model, data.test, rank, world_size),
            "train_loss_last_10pct": statistics.mean(series["loss"][-max(1, steps // 10):]),
            "val_curve": curve, "syncs": syncs, "bits_per_param_step": bits,
            "sync_bits_per_param_step": sync_bits, "vote_mismatch": mismatch, "zero_direction": zero_direction,
            "num_parameters": num_parameters, "wall_s": wall, "series": series}


def worker(args: argparse.Namespace) -> NoReturn:
    """Train every setting x lr of ``args`` for ``args.seed``; rank 0 writes the runs; every rank exits."""
    rank, world_size = harness.join_group()
    lion_group, _ = dist.new_subgroups(group_size=1)
    task = TASKS[args.task]
    data = task.make_data(args.smoke)
    runs = []
    for name in args.settings:
        for lr in suite.lr_grid(task.adamw_lr, "lion", tuple(args.lr_multiples)):
            run = train_run(task, data, name, lr, args, lion_group)
            series = run.pop("series")
            run["diagnostics"] = {field: binned(values, RECORD_EVERY) for field, values in series.items()}
            run["windows"] = {label: {field: mean_of(values[lo:hi]) for field, values in series.items()}
                              for label, (lo, hi) in windows(args, run["steps"]).items()}
            runs.append(run)
            if rank == 0:
                late = run["windows"]["plateau"]
                shown = " ".join(f"{f} {late[f]:.3f}" for f in ("tie", "flip", "spread") if late[f] is not None)
                print(f"  seed {args.seed} {name:11s} lr {lr:.2e}: val {run['val']:.4f} test {run['test']:.4f} "
                      f"| plateau window: {shown}, syncs {run['syncs']} ({run['wall_s']:.1f} s)", flush=True)
    harness.finish_worker(args.result, {"runs": runs})


def windows(args: argparse.Namespace, steps: int) -> dict[str, tuple[int, int]]:
    """Step ranges (0-based, end exclusive) the diagnostics are averaged over: the plateau window and thirds."""
    lo, hi = args.window if args.window else (steps // 2, steps)
    return {"plateau": (max(0, lo), min(steps, hi)), "first_third": (0, steps // 3),
            "second_third": (steps // 3, 2 * steps // 3), "last_third": (2 * steps // 3, steps)}


# -------------------------------------------------------------------------- orchestration

def stalls(runs: list[dict], ratio: float) -> list[dict]:
    """The (seed, lr) where the majority's test metric is at least ``ratio`` times global Lion's (lower is better)."""
    found = []
    for run in runs:
        if run["setting"] != MAJORITY:
            continue
        same = {r["setting"]: r for r in runs if r["seed"] == run["seed"] and r["lr"] == run["lr"]}
        if GLOBAL in same and run["test"] >= ratio * same[GLOBAL]["test"]:
            found.append({"seed": run["seed"], "lr": run["lr"],
                          "test": {name: r["test"] for name, r in same.items()},
                          "ratio_to_lion_global": run["test"] / same[GLOBAL]["test"]})
    return found


def summarize(task: suite.Task, runs: list[dict]) -> dict[str, dict]:
    """Per setting: the lr chosen on mean validation (the suite's rule), test mean and std there, bits, syncs."""
    table = {}
    for name in dict.fromkeys(r["setting"] for r in runs):
        mine = [{**r, "optimizer": name} for r in runs if r["setting"] == name]
        lr = suite.choose(task, mine)
        at_lr = [r for r in mine if r["lr"] == lr]
        tests = [r["test"] for r in at_lr]
        table[name] = {"lr": lr, "test_mean": statistics.mean(tests),
                       "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "n": len(tests),
                       "bits_per_param_step": statistics.mean(r["bits_per_param_step"] for r in at_lr),
                       "syncs_mean": statistics.mean(r["syncs"] for r in at_lr)}
    return table


def window_table(runs: list[dict], cases: list[dict], window: str = "plateau") -> dict[str, dict]:
    """Per setting: the window's diagnostics averaged over ``cases`` (each a seed and lr)."""
    out = {}
    for name in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == name and any(
            r["seed"] == c["seed"] and r["lr"] == c["lr"] for c in cases)]
        if mine:
            out[name] = {field: mean_of([r["windows"][window][field] for r in mine]) for field in FIELDS}
            out[name]["test_mean"] = statistics.mean(r["test"] for r in mine)
            out[name]["bits_per_param_step"] = statistics.mean(r["bits_per_param_step"] for r in mine)
            out[name]["syncs_mean"] = statistics.mean(r["syncs"] for r in mine)
    return out


def print_tables(args: argparse.Namespace, runs: list[dict], table: dict, found: list[dict],
                 diagnostics: dict[str, dict]) -> None:
    names = list(dict.fromkeys(r["setting"] for r in runs))
    lrs = sorted({r["lr"] for r in runs})
    print(f"\n{args.task}: test metric per seed and lr ({' / '.join(names)})")
    for seed in args.seeds:
        cells = []
        for lr in lrs:
            by = {r["setting"]: r["test"] for r in runs if r["seed"] == seed and r["lr"] == lr}
            cells.append(f"lr {lr:.1e} " + "/".join(f"{by[n]:.4f}" for n in names if n in by))
        print(f"  seed {seed}: " + "  ".join(cells))
    print(f"\nlr chosen on validation:\n{'setting':12s} {'lr':>8} {'mean':>8} {'std':>8} {'bits':>6} {'syncs':>6}")
    for name, row in table.items():
        print(f"{name:12s} {row['lr']:8.1e} {row['test_mean']:8.4f} {row['test_std']:8.4f} "
              f"{row['bits_per_param_step']:6.2f} {row['syncs_mean']:6.1f}")
    print(f"\nstalls (majority >= {args.stall_ratio} x lion_global): "
          + (", ".join(f"seed {s['seed']} lr {s['lr']:.1e} ({s['ratio_to_lion_global']:.2f}x)" for s in found)
             or "none"))
    if diagnostics:
        print("\nplateau window, averaged over the stalls:")
        print(f"{'setting':12s} " + " ".join(f"{f:>9}" for f in FIELDS))
        for name, row in diagnostics.items():
            print(f"{name:12s} " + " ".join("     none" if row[f] is None else f"{row[f]:9.4f}" for f in FIELDS))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="product")
    parser.add_argument("--settings", choices=list(SETTINGS), nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--world_size", type=harness.positive_int, default=4)
    parser.add_argument("--steps", type=harness.positive_int, default=None, help="default: the task's (300)")
    parser.add_argument("--batch_size", type=harness.positive_int, default=None, help="rows per rank and step "
                        "(default: the task's; product: 8)")
    parser.add_argument("--lr_multiples", type=float, nargs="+", default=list(suite.LR_GRID), metavar="M")
    parser.add_argument("--window", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="steps [START, END) of the plateau window (default: the second half)")
    parser.add_argument("--stall_ratio", type=float, default=1.5,
                        help="a stall: the majority's test metric at least this times global Lion's, same seed and lr")
    parser.add_argument("--tie_ratio", type=float, default=1.2, help="tie_sync: sync after a step whose tie "
                        "fraction exceeds this times the mean of the 4 steps after the last sync")
    parser.add_argument("--min_gap", type=harness.positive_int, default=32, help="tie_sync: steps between syncs, "
                        "at least; the first sync is at this step")
    parser.add_argument("--tied_every", type=harness.positive_int, default=8, help="tied_sync: every this many "
                        "steps, average the momenta of the tied coordinates")
    parser.add_argument("--tag", default=None, help="results file stall-TAG-DATE.json, for a non-default run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch (a seed)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the worker's
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke and not args.worker:
        args.seeds, args.lr_multiples, args.timeout = args.seeds[:1], [1.0], 50.0
        args.steps = args.steps or 34  # msync16 syncs twice, msync32 once
        args.min_gap, args.tied_every = min(args.min_gap, 8), min(args.tied_every, 4)
    args.batch_size = args.batch_size or (2 if args.smoke else TASKS[args.task].batch_size)
    if args.world_size % 2:
        parser.error(f"--world_size {args.world_size}: ties need an even number of voters")
    return args


def launch(args: argparse.Namespace, seed: int) -> list[dict]:
    """One torchrun launch trains every setting x lr for ``seed``; return its runs."""
    worker_args = ["--task", args.task, "--settings", *args.settings, "--seed", str(seed),
                   "--lr_multiples", *map(str, args.lr_multiples), "--batch_size", str(args.batch_size),
                   "--tie_ratio", str(args.tie_ratio), "--min_gap", str(args.min_gap),
                   "--tied_every", str(args.tied_every), *(["--smoke"] if args.smoke else []),
                   *(["--steps", str(args.steps)] if args.steps else []),
                   *(["--window", *map(str, args.window)] if args.window else [])]
    return harness.launch_local(__spec__.name, worker_args, args.world_size, args.timeout)["runs"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)  # ends the process
    task = TASKS[args.task]
    runs: list[dict] = []
    start = time.perf_counter()
    for seed in args.seeds:
        print(f"{args.task} seed {seed}: {args.world_size} ranks ...", flush=True)
        runs += launch(args, seed)
        print(f"{args.task} seed {seed} done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    elapsed = time.perf_counter() - start
    table = summarize(task, runs)
    found = stalls(runs, args.stall_ratio)
    diagnostics = window_table(runs, found)
    print_tables(args, runs, table, found, diagnostics)
    print(f"({elapsed:.0f} s)")
    steps = args.steps or task.steps
    settings = {
        "task": args.task, "metric": task.metric, "world_size": args.world_size, "seeds": args.seeds,
        "steps": steps, "batch_size_per_rank": args.batch_size, "lr_grid_multiples": args.lr_multiples,
        "lion_centre_lr": task.adamw_lr * suite.FAMILY_SCALES["lion"][0],
        "weight_decay": task.weight_decay * suite.FAMILY_SCALES["lion"][1], "betas": suite.LION_BETAS,
        "schedule": f"linear warm-up {suite.WARMUP_FRACTION:.0%} of steps, cosine to {suite.MIN_LR_RATIO} x peak",
        "settings": {name: vars(SETTINGS[name]) for name in args.settings},
        "tie_sync": {"tie_ratio": args.tie_ratio, "min_gap": args.min_gap},
        "tied_sync": {"every": args.tied_every},
        "windows": windows(args, steps), "stall_ratio": args.stall_ratio,
        "diagnostics": {"record_every": RECORD_EVERY, "eval_every": EVAL_EVERY, "drift_window": DRIFT_WINDOW,
                        "near_tie": "|sum of the N signs| <= 2",
                        "spread": "mean_j std_i m_ij (population std across voters) / mean_ij |m_ij|"},
        "bits_convention": "bits per parameter per step a voter sends: the vote's (comm_stats) plus the syncs' "
                           "(bf16 ring all-reduce, 2*(N-1)/N*2 bytes per averaged coordinate); lion_global: fp32 "
                           "ring all-reduce 64*(N-1)/N; the diagnostics' all-gather is not counted",
    }
    payload = {"settings": settings, "runs": runs, "summary": table, "stalls": found,
               "plateau_diagnostics_over_stalls": diagnostics, "wall_time_s": elapsed}
    harness.write_results(f"stall-{args.tag}" if args.tag else "stall", payload, args.out, args.smoke)
    bad = [(r["setting"], r["seed"], r["lr"], r["vote_mismatch"]) for r in runs if r["vote_mismatch"]]
    if bad:
        raise SystemExit(f"the voted sign read from the parameter change differs from the gathered signs' vote: {bad}")
    return payload


if __name__ == "__main__":
    main()
