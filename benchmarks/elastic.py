"""Elastic resume: the cost of resuming DistLion on another topology, per ``on_topology_change`` rule.

A run saves with ``distlion.save`` halfway, and a new launch of processes on another
topology (another world size, or another ``ranks_per_node``) builds the model and DistLion
afresh, loads rank 0's model weights (``torch.save``'d beside the optimizer's files) and
``distlion.load``s the optimizer, which maps the M saved voters' momenta to the M' new
voters by the rule (``distlion.checkpoint.elastic``: ``mean``, ``modulo``,
``mean_deviation``), then trains the remaining half. Its final validation metric is
compared with the uninterrupted run of the same seed on the source topology (the gap) and
set against the seed-to-seed spread of uninterrupted runs on the source and on the target
topology. Topologies are nodes x ranks per node: ``4x1`` (4 ranks, each a voter), ``2x1``
(2 ranks), ``2x2`` (4 ranks, 2 nodes of 2 ranks: 2 voters). The changes:

- ``4to2`` (4→2): saved by 4x1, resumed on 2x1;
- ``2to4`` (2→4): saved by 2x1, resumed on 4x1;
- ``4x1to2x2`` (4x1→2x2): saved by 4x1, resumed on 2x2.

With the data stream below a node's gradient (the mean of its ranks') is the gradient of
its half of the global batch, as a rank's on 2x1: 2x2 trains as 2x1 does up to float
rounding (the node averages two quarter-batch gradients), which the sign step mostly
absorbs, and the 4x1→2x2 resume should end where the 4→2 resume of the same rule does. It
tests the node layout's resharding (each rank holds a chunk of its node's momentum); the
result records, per seed and rule, whether the final weights are bitwise those of 2x1 and
how far apart the two validation metrics are (``node_layout_checks``).

A ``same`` row resumes on the source topology itself (with ``on_topology_change="refuse"``,
as every run but the rules' resumes): it must equal the uninterrupted run bitwise (final
weights, every rank's momentum, metrics); the result records the check and the script fails
when it does not hold.

Tasks, models, data, losses, evaluation, weight-decay groups, betas and schedule are
``benchmarks.suite``'s (imported: ``TASKS``, ``Data``, ``evaluate``, ``decay_groups``,
``lr_at`` with its warm-up and cosine). The optimizer is the suite's ``distlion_majority``
(majority vote, Lion family: 5x AdamW's decay) at the lr the suite chose for it on
validation (read from ``--suite_results``, default ``suite-2026-12-01.json``: 6e-4 on ``lm``
and ``teacher``, 1.8e-3 on ``cnn`` and ``tabular``), with the topology's ``ranks_per_node``
and the rule. Defaults: the ``tabular`` and ``lm`` tasks, 300 steps (the suite's, for which
its lr was chosen), seeds 0, 1, 2: ``lm`` is the transformer (the suite's headline task, the
widest seed spread), ``tabular`` has the narrowest seed spread of the suite's DistLion runs,
so small gaps show there. The whole default study is a few minutes of 2 CPU cores.

Data stream: the global batch is the suite's (4 ranks x the task's per-rank batch) on every
topology. At step s, the whole global batch is drawn from a generator keyed by (seed, s)
alone (``Data.batch`` with rank 0 of world size 1: the lm task's windows of the train text,
other tasks' rows of the train split) and rank r of N takes the r-th of N equal slices. So
each step sees the same global batch whatever the world size or the resume point: a
resumed run continues the uninterrupted run's stream at step T/2 exactly, and only how the
batch is split among voters (and the voters' momenta) changes. The lr schedule runs over
the whole T steps; the resumed half continues it at T/2. The seed sets the initial
weights and the batches.

Launches (torchrun on loopback, each bounded by ``--timeout``): per (task, seed), first one
launch per world size trains the uninterrupted runs (T steps; 4x1, 2x1 and 2x2 as the
changes need) and the first halves (T/2 steps, then ``distlion.save``) of each source
topology, every run from fresh weights; then one launch per target world size runs every
resume onto it (the rules and the ``same`` resume), each building the model and DistLion
afresh and loading the checkpoint written by the earlier launch. The first halves are shared
by every rule and change of a source topology (a deterministic run: the same checkpoint),
and the uninterrupted 4x1 and 2x1 runs are both the baseline of the changes from them and
the target baseline of the changes onto them. ``--launch_per_run`` gives every run its own
launch instead: the same runs bitwise (weights, momenta, metrics), about 2.5x the time, as
process start-up is most of a short run's.

Gaps follow the suite: positive is worse, % above the reference's value for losses, points
(of 100) below it for accuracy. A seed spread is max - min of the uninterrupted runs' final
validation metric over seeds, in the same units (% of the best seed's value for losses,
points for accuracy), and their sample std; a rule's mean gap is "within the spread" when
its magnitude is at most the spread of the uninterrupted runs on the source topology and
on the target topology::

    python -m benchmarks.elastic                                   # tabular + lm, 3 seeds, 3 changes, 300 steps
    python -m benchmarks.elastic --tasks cnn --seeds 0 --changes 4to2 --steps 200
    python -m benchmarks.elastic --smoke                           # tiny: tabular, 1 seed, 4x1to2x2, 4 steps

Writes ``benchmarks/results/elastic-DATE.json``: every run, the per-seed gaps, the same-topology
checks, the spreads and the summary per (task, change, rule).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn

import distlion
from benchmarks import harness, suite
from distlion import DistLion
from distlion.checkpoint.elastic import RULES
from launch.recipe import lr_at

OPTIMIZER = "distlion_majority"  # the suite's optimizer whose chosen lr is used; its spec sets vote and family
SUITE_WORLD_SIZE = 4  # the suite's ranks: the global batch is this times the task's per-rank batch
SUITE_RESULTS = os.path.join(harness.RESULTS_DIR, "suite-2026-12-01.json")
DEFAULT_TASKS = ("tabular", "lm")
SAME = "same"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class Topology:
    nodes: int
    ranks_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def name(self) -> str:
        return f"{self.nodes}x{self.ranks_per_node}"


TOPOLOGIES = {t.name: t for t in (Topology(4, 1), Topology(2, 1), Topology(2, 2))}
# change -> (label, source topology, target topology)
CHANGES = {"4to2": ("4→2", "4x1", "2x1"), "2to4": ("2→4", "2x1", "4x1"), "4x1to2x2": ("4x1→2x2", "4x1", "2x2")}


# -------------------------------------------------------------------------------- workers

def global_batch_size(task: suite.Task, smoke: bool) -> int:
    return SUITE_WORLD_SIZE * (2 if smoke else task.batch_size)


def rank_batch(data: suite.Data, *, step: int, seed: int, size: int, rank: int, world_size: int):
    """Rank ``rank``'s slice of step ``step``'s global batch, which depends on (seed, step) only."""
    x, y = data.batch(step=step, rank=0, world_size=1, batch_size=size, seed=seed)
    share, left = divmod(size, world_size)
    assert not left, f"a global batch of {size} does not split into {world_size} equal slices"
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def build_optimizer(model: nn.Module, task: suite.Task, lr: float, ranks_per_node: int, rule: str) -> DistLion:
    """The suite's ``distlion_majority`` (its groups, betas and decay) with this topology's nodes and ``rule``."""
    spec = suite.OPTIMIZERS[OPTIMIZER]
    groups = suite.decay_groups(model, task.weight_decay * suite.FAMILY_SCALES[spec.family][1])
    return DistLion(groups, lr=lr, betas=suite.LION_BETAS, vote=spec.vote, vote_ema_beta=spec.vote_ema_beta,
                    ranks_per_node=ranks_per_node, momentum_sync_every=spec.momentum_sync_every, k=spec.k,
                    on_topology_change=rule)


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return hasher.hexdigest()[:16]


def momentum_digests(optimizer: DistLion) -> list[str]:
    """Every rank's digest of its optimizer state tensors (the momentum differs per voter)."""
    state = optimizer.state_dict()["state"]
    mine = digest(value for key in sorted(state, key=str) for _, value in sorted(state[key].items())
                  if isinstance(value, torch.Tensor))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def run_job(job: dict, task: suite.Task, data: suite.Data, args: argparse.Namespace) -> dict:
    """Train steps [start, stop) of a T-step run from fresh weights, or from ``job["resume"]``; save at the end
    when ``job["save"]`` is set; return the metrics at the end."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    topology = TOPOLOGIES[job["topology"]]
    assert topology.world_size == world_size, (job, world_size)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run of a seed
    model = task.build_model(args.smoke)
    # a resume on another topology maps the momenta by its rule; every other run refuses another topology
    rule = job["rule"] if job["rule"] in RULES else "refuse"
    optimizer = build_optimizer(model, task, args.lr, topology.ranks_per_node, rule)
    start_time = time.perf_counter()
    if job["resume"]:
        model.load_state_dict(torch.load(os.path.join(job["resume"], MODEL_FILE), weights_only=True))
        distlion.load(optimizer, job["resume"])
    warmup_steps = max(1, round(suite.WARMUP_FRACTION * args.steps))  # the suite's schedule, over all T steps
    schedule = SimpleNamespace(lr=args.lr, steps=args.steps, warmup_steps=warmup_steps,
                               min_lr_ratio=suite.MIN_LR_RATIO)
    size = global_batch_size(task, args.smoke)
    losses = []
    for step in range(job["start"], job["stop"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        x, y = rank_batch(data, step=step, seed=args.seed, size=size, rank=rank, world_size=world_size)
        loss = task.loss(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        losses.append(loss.item())
    if job["save"]:
        os.makedirs(job["save"], exist_ok=True)
        distlion.save(optimizer, job["save"])
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(job["save"], MODEL_FILE))
        dist.barrier()
    return {**job, "task": task.name, "seed": args.seed, "world_size": world_size,
            "ranks_per_node": topology.ranks_per_node, "steps_taken": optimizer.steps_taken,
            "train_loss_mean": statistics.mean(losses) if losses else None,
            "val": suite.evaluate(task, model, data.val, rank, world_size),
            "test": suite.evaluate(task, model, data.test, rank, world_size),
            "weights_digest": digest(model.parameters()), "momentum_digests": momentum_digests(optimizer),
            "wall_s": time.perf_counter() - start_time}


def worker(args: argparse.Namespace) -> NoReturn:
    """Run ``args.jobs`` (a JSON list) in order for ``args.tasks[0]`` and ``args.seed``; rank 0 writes them."""
    rank, _ = harness.join_group()
    task = suite.TASKS[args.tasks[0]]
    data = task.make_data(args.smoke)
    runs = []
    for job in json.loads(args.jobs):
        run = run_job(job, task, data, args)
        runs.append(run)
        if rank == 0:
            print(f"    {describe(run)}: val {run['val']:.4f} ({run['wall_s']:.1f} s)", flush=True)
    harness.finish_worker(args.result, {"runs": runs})


def describe(run: dict) -> str:
    what = {"uninterrupted": f"uninterrupted {run['topology']}", "first_half": f"first half {run['topology']}",
            "resume": f"resume {run['source']}->{run['topology']} {run['rule']}"}[run["kind"]]
    return f"{run['task']} seed {run['seed']} {what}"


# --------------------------------------------------------------------------- orchestration

def job(kind: str, topology: str, start: int, stop: int, *, save: str | None = None, resume: str | None = None,
        source: str | None = None, rule: str | None = None) -> dict:
    return {"kind": kind, "topology": topology, "start": start, "stop": stop, "save": save, "resume": resume,
            "source": source, "rule": rule}


def plan(changes: list[str], steps: int, directory: str) -> list[list[dict]]:
    """The seed's jobs in two phases: uninterrupted runs and first halves (saving), then every resume."""
    half = steps // 2
    sources = list(dict.fromkeys(CHANGES[c][1] for c in changes))
    uninterrupted = list(dict.fromkeys(t for c in changes for t in CHANGES[c][1:]))
    first = [job("uninterrupted", t, 0, steps) for t in uninterrupted]
    first += [job("first_half", s, 0, half, save=os.path.join(directory, s)) for s in sources]
    resumes = [job("resume", s, half, steps, resume=os.path.join(directory, s), source=s, rule=SAME)
               for s in sources]
    resumes += [job("resume", CHANGES[c][2], half, steps, resume=os.path.join(directory, CHANGES[c][1]),
                    source=CHANGES[c][1], rule=rule) for c in changes for rule in RULES]
    return [first, resumes]


def launches(phase: list[dict], per_run: bool) -> list[list[dict]]:
    """One launch per world size (jobs in order), or one per job."""
    if per_run:
        return [[j] for j in phase]
    by_world: dict[int, list[dict]] = {}
    for j in phase:
        by_world.setdefault(TOPOLOGIES[j["topology"]].world_size, []).append(j)
    return list(by_world.values())


def launch(args: argparse.Namespace, task: str, seed: int, lr: float, jobs: list[dict]) -> list[dict]:
    world_size = TOPOLOGIES[jobs[0]["topology"]].world_size
    worker_args = ["--tasks", task, "--seed", str(seed), "--lr", repr(lr), "--steps", str(args.steps),
                   "--jobs", json.dumps(jobs), *(["--smoke"] if args.smoke else [])]
    return harness.launch_local(__spec__.name, worker_args, world_size, args.timeout)["runs"]


def source_version() -> dict:
    """The commit this ran from and whether distlion/ or benchmarks/ had uncommitted changes."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=harness.REPO,
                              timeout=30).stdout.rstrip("\n")
    try:
        return {"commit": git("rev-parse", "HEAD").strip(),
                "uncommitted": git("status", "--porcelain", "--", "distlion", "benchmarks").splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def suite_lrs(path: str, tasks: list[str]) -> dict[str, float]:
    """The lr the suite chose on validation for ``OPTIMIZER`` on each task."""
    with open(path) as f:
        chosen = json.load(f)["chosen_lr"]
    missing = [t for t in tasks if OPTIMIZER not in chosen.get(t, {})]
    if missing:
        raise SystemExit(f"--suite_results {path} chose no lr for {OPTIMIZER} on {missing}")
    return {t: chosen[t][OPTIMIZER] for t in tasks}


def spread(task: suite.Task, values: list[float]) -> dict:
    """Seed-to-seed spread of uninterrupted runs: max - min (also in gap units), sample std."""
    best, worst = (max(values), min(values)) if task.higher_is_better else (min(values), max(values))
    return {"values": values, "mean": statistics.mean(values), "max_minus_min": max(values) - min(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "spread_gap_units": suite.gap(task, worst, best)}


def same_check(resumed: dict, uninterrupted: dict) -> dict:
    keys = ("val", "test", "weights_digest", "momentum_digests")
    return {"exact": all(resumed[k] == uninterrupted[k] for k in keys),
            **{k: resumed[k] == uninterrupted[k] for k in keys}}


def analyse(args: argparse.Namespace, runs: list[dict]) -> dict:
    """Per-seed gaps, same-topology checks, spreads and the summary per (task, change, rule)."""
    def find(task, seed, kind, topology, rule=None, source=None):
        (run,) = [r for r in runs if r["task"] == task and r["seed"] == seed and r["kind"] == kind and
                  r["topology"] == topology and (rule is None or r["rule"] == rule) and
                  (source is None or r["source"] == source)]
        return run

    gaps, checks, spreads, summary = [], [], {}, {}
    for name in args.tasks:
        task = suite.TASKS[name]
        topologies = dict.fromkeys(t for c in args.changes for t in CHANGES[c][1:])
        spreads[name] = {t: spread(task, [find(name, s, "uninterrupted", t)["val"] for s in args.seeds])
                         for t in topologies}
        summary[name] = {}
        for change in args.changes:
            label, source, target = CHANGES[change]
            rows = {}
            for rule in (SAME, *RULES):
                per_seed = {}
                for seed in args.seeds:
                    base = find(name, seed, "uninterrupted", source)
                    target_base = find(name, seed, "uninterrupted", source if rule == SAME else target)
                    resumed = find(name, seed, "resume", source if rule == SAME else target, rule, source)
                    row = {"task": name, "change": change, "label": label, "rule": rule, "seed": seed,
                           "val": resumed["val"], "test": resumed["test"], "uninterrupted_source_val": base["val"],
                           "gap_vs_source": suite.gap(task, resumed["val"], base["val"]),
                           "uninterrupted_target_val": target_base["val"],
                           "gap_vs_target": suite.gap(task, resumed["val"], target_base["val"])}
                    if rule == SAME:
                        row["same"] = same_check(resumed, base)
                        if change == next(c for c in args.changes if CHANGES[c][1] == source):
                            checks.append({"task": name, "seed": seed, "topology": source, **row["same"]})
                    gaps.append(row)
                    per_seed[seed] = row
                mean_gap = statistics.mean(r["gap_vs_source"] for r in per_seed.values())
                rows[rule] = {
                    "mean_gap_vs_source": mean_gap,
                    "mean_abs_gap_vs_source": statistics.mean(abs(r["gap_vs_source"]) for r in per_seed.values()),
                    "gap_vs_source": {s: r["gap_vs_source"] for s, r in per_seed.items()},
                    "mean_gap_vs_target": statistics.mean(r["gap_vs_target"] for r in per_seed.values()),
                    "gap_vs_target": {s: r["gap_vs_target"] for s, r in per_seed.items()},
                    "val": {s: r["val"] for s, r in per_seed.items()},
                    "within_source_spread": abs(mean_gap) <= spreads[name][source]["spread_gap_units"],
                    "within_target_spread": abs(mean_gap) <= spreads[name][target]["spread_gap_units"]}
                if rule == SAME:
                    rows[rule]["exact"] = all(r["same"]["exact"] for r in per_seed.values())
            summary[name][change] = {"label": label, "source": source, "target": target,
                                     "source_spread": spreads[name][source], "target_spread": spreads[name][target],
                                     "rules": rows}
    ranking = {name: sorted(RULES, key=lambda rule: statistics.mean(
        summary[name][c]["rules"][rule]["mean_abs_gap_vs_source"] for c in args.changes)) for name in args.tasks}
    return {"gaps": gaps, "same_checks": checks, "node_layout_checks": node_layout_checks(args, runs),
            "spreads": spreads, "summary": summary, "rules_by_mean_abs_gap": ranking}


def node_layout_checks(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """2x2 trains as 2x1 does (a node's gradient is the mean of its ranks', its half of the global batch):
    whether each 4x1->2x2 resume ends on the weights of the 4x1->2x1 resume of the same rule and seed."""
    if not {"4to2", "4x1to2x2"} <= set(args.changes):
        return []
    ends = {(r["task"], r["seed"], r["topology"], r["rule"]): r for r in runs
            if r["kind"] == "resume" and r["source"] == "4x1"}
    ends.update({(r["task"], r["seed"], r["topology"], "uninterrupted"): r for r in runs
                 if r["kind"] == "uninterrupted"})
    checks = []
    for t in args.tasks:
        for s in args.seeds:
            for rule in ("uninterrupted", *RULES):
                node, flat = ends[t, s, "2x2", rule], ends[t, s, "2x1", rule]
                checks.append({"task": t, "seed": s, "rule": rule,
                               "2x2_weights_equal_2x1": node["weights_digest"] == flat["weights_digest"],
                               "val_relative_difference": abs(node["val"] / flat["val"] - 1)})
    return checks


def print_tables(args: argparse.Namespace, analysis: dict) -> None:
    for name in args.tasks:
        task = suite.TASKS[name]
        unit = "pt" if task.higher_is_better else "%"
        print(f"\n{name}: validation {task.metric.replace('test ', '')} at step {args.steps}, lr {args.lrs[name]:.1e};"
              f" gap vs the uninterrupted run on the source topology, same seed ({unit}, + is worse)")
        seeds = "".join(f"{'seed ' + str(s):>10}" for s in args.seeds)
        print(f"{'change':10s} {'rule':15s} {'mean gap':>9}{seeds} {'vs target':>10} {'in spread':>9}")
        for change in args.changes:
            entry = analysis["summary"][name][change]
            for rule, row in entry["rules"].items():
                per_seed = "".join(f"{row['gap_vs_source'][s]:+10.3f}" for s in args.seeds)
                within = "exact" if rule == SAME and row["exact"] else \
                    ("NOT EXACT" if rule == SAME else
                     "yes" if row["within_source_spread"] and row["within_target_spread"] else "no")
                print(f"{entry['label']:10s} {rule:15s} {row['mean_gap_vs_source']:+9.3f}{per_seed} "
                      f"{row['mean_gap_vs_target']:+10.3f} {within:>9}")
        print(f"uninterrupted runs, seed spread ({unit}: max-min relative to the best seed):")
        for topology, s in analysis["spreads"][name].items():
            values = " ".join(f"{v:.4f}" for v in s["values"])
            print(f"  {topology}: {values}  mean {s['mean']:.4f}  max-min {s['max_minus_min']:.4f} "
                  f"({s['spread_gap_units']:.3f}{unit})  std {s['std']:.4f}")
        print(f"rules by mean |gap| over seeds and changes: {', '.join(analysis['rules_by_mean_abs_gap'][name])}")
        checks = [c for c in analysis["node_layout_checks"] if c["task"] == name]
        if checks:
            print(f"2x2 ends on the weights of 2x1 (uninterrupted and 4x1 resumes): bitwise in "
                  f"{sum(c['2x2_weights_equal_2x1'] for c in checks)} of {len(checks)}, validation metrics at most "
                  f"{max(c['val_relative_difference'] for c in checks):.1e} apart (relative)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", choices=sorted(suite.TASKS), nargs="+", default=None,
                        help=f"default: {' '.join(DEFAULT_TASKS)} (smoke: tabular)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--changes", choices=list(CHANGES), nargs="+", default=None,
                        help="default: all (smoke: 4x1to2x2)")
    parser.add_argument("--steps", type=harness.positive_int, default=None,
                        help="T: every run's schedule, resumes save at T/2 (default 300, the suite's; smoke: 4)")
    parser.add_argument("--suite_results", default=SUITE_RESULTS, metavar="JSON",
                        help=f"a suite results file: its chosen lr for {OPTIMIZER} on each task")
    parser.add_argument("--launch_per_run", action="store_true", help="one launch per run, not per world size")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per launch (default 900; smoke: 120)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the worker's
    parser.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)  # the worker's
    parser.add_argument("--jobs", default=None, help=argparse.SUPPRESS)  # the worker's
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke and not args.worker:  # one task, one seed, one change, a few steps
        args.tasks, args.seeds = (args.tasks or ["tabular"])[:1], args.seeds[:1]
        args.changes, args.steps = args.changes or ["4x1to2x2"], args.steps or 4
        args.timeout = args.timeout or 120.0
    args.tasks, args.changes = args.tasks or list(DEFAULT_TASKS), args.changes or list(CHANGES)
    args.steps, args.timeout = args.steps or 300, args.timeout or 900.0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (resumes save at T/2)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)  # ends the process
    args.lrs = suite_lrs(args.suite_results, args.tasks)
    source = source_version()  # at the start: the code the runs import
    runs: list[dict] = []
    start = time.perf_counter()
    for name in args.tasks:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="elastic-") as directory:
                for phase in plan(args.changes, args.steps, directory):
                    for jobs in launches(phase, args.launch_per_run):
                        world_size = TOPOLOGIES[jobs[0]["topology"]].world_size
                        print(f"{name} seed {seed}: {len(jobs)} run(s) on {world_size} ranks ...", flush=True)
                        for run in launch(args, name, seed, args.lrs[name], jobs):
                            for key in ("save", "resume"):  # temporary paths
                                run[key] = bool(run[key])
                            runs.append(run)
                        print(f"{name} seed {seed}: done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    elapsed = time.perf_counter() - start
    analysis = analyse(args, runs)
    print_tables(args, analysis)
    print(f"({elapsed:.0f} s)")
    settings = {
        "optimizer": {"suite_spec": OPTIMIZER, **vars(suite.OPTIMIZERS[OPTIMIZER]), "betas": suite.LION_BETAS,
                      "lr_source": os.path.basename(args.suite_results)},
        "schedule": f"linear warm-up {suite.WARMUP_FRACTION:.0%} of steps, cosine to {suite.MIN_LR_RATIO} x peak, "
                    f"over all T steps",
        "steps": args.steps, "resume_at": args.steps // 2, "seeds": args.seeds, "rules": list(RULES),
        "changes": {c: dict(zip(("label", "source", "target"), CHANGES[c])) for c in args.changes},
        "topologies": {name: {"world_size": t.world_size, "ranks_per_node": t.ranks_per_node,
                              "voters": t.nodes} for name, t in TOPOLOGIES.items()},
        "tasks": {name: {"metric": f"validation {suite.TASKS[name].metric.replace('test ', '')}",
                         "higher_is_better": suite.TASKS[name].higher_is_better, "lr": args.lrs[name],
                         "weight_decay": suite.TASKS[name].weight_decay * suite.FAMILY_SCALES["lion"][1],
                         "global_batch": global_batch_size(suite.TASKS[name], args.smoke)} for name in args.tasks},
        "data_stream": "global batch of step s drawn from a generator keyed by (seed, s); rank r of N takes the "
                       "r-th of N equal slices",
        "source": source,
        "launches": "one per run" if args.launch_per_run else "one per (task, seed, phase, world size)",
        "gap_convention": "positive is worse: % above the reference (loss, error), points below it (accuracy)",
        "spread_convention": "max - min of the uninterrupted runs over seeds; spread_gap_units: the worst seed's "
                             "gap to the best; within: |mean gap| <= the spread on source and target",
    }
    payload = {"settings": settings, "runs": runs, **analysis, "wall_time_s": elapsed}
    harness.write_results("elastic", payload, args.out, args.smoke)
    not_exact = [c for c in analysis["same_checks"] if not c["exact"]]
    if not_exact:
        raise SystemExit(f"a resume on the saved topology did not match the uninterrupted run: {not_exact}")
    return payload


if __name__ == "__main__":
    main()
