"""Where the optimizer-plus-communication phase spends its time, inside the real step.

Runs the phase of ``benchmarks.step_time`` (DistLion's ``optimizer.step()``; AdamW + DDP's
deferred all-reduce then ``AdamW.step()``) on N loopback gloo ranks, with a timer
around every kernel of ``distlion.kernels.kernels_for("cpu")`` and every
torch.distributed collective, so each stage is timed where it runs, with the caches and
the waits of a real step (a collective's time includes waiting for the slowest rank;
for one launched without waiting, its launch plus its ``wait``).
``rest`` is what no timer covered: Python, copies into and out of the exchange buffers,
gathering gradients into the buckets (where the C kernels do not read them in place),
and for AdamW its whole update. The kernels timed are the ops of
``distlion.kernels.contract``. From the repository root::

    python -m benchmarks.step_breakdown                  # 3.89M params, 4 ranks
    python -m benchmarks.step_breakdown --size medium    # 24.2M params
    python -m benchmarks.step_breakdown --smoke
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks import harness
from distlion.kernels import contract, kernels_for

COLLECTIVES = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "all_reduce")


class _TimedWork:
    """An async collective's work handle whose ``wait`` adds to the collective's time."""

    def __init__(self, work, totals: dict[str, float], name: str):
        self._work, self._totals, self._name = work, totals, name

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._totals[self._name] += time.perf_counter() - start


@contextlib.contextmanager
def stage_timers(totals: dict[str, float]):
    """Add each wrapped function's time to ``totals[name]`` while the context is open."""
    targets = [(kernels_for(torch.device("cpu")), contract.OPS), (dist, COLLECTIVES)]
    originals = []
    for module, names in targets:
        for name in names:
            function = getattr(module, name, None)
            if function is None:
                continue

            def timed(*args, _function=function, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    result = _function(*args, **kwargs)
                finally:
                    totals[_name] += time.perf_counter() - start
                return _TimedWork(result, totals, _name) if kwargs.get("async_op") else result

            originals.append((module, name, function))
            setattr(module, name, timed)
    try:
        yield totals
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


def breakdown(trainer: harness.Trainer, batch, steps: int) -> dict[str, float]:
    """Median ms per stage of ``trainer.phase()`` over ``steps`` steps (all ranks start it together)."""
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(steps):
        trainer.forward_backward(*batch)
        dist.barrier()
        totals: dict[str, float] = collections.defaultdict(float)
        start = time.perf_counter()
        with stage_timers(totals):
            trainer.phase()
        total = time.perf_counter() - start
        for name, seconds in totals.items():
            samples[name].append(seconds)
        samples["rest"].append(total - sum(totals.values()))
        samples["total"].append(total)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def worker(args: argparse.Namespace) -> None:
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    batch = harness.make_batch(config, args.batch_size, args.seq_len, rank)
    trainers = [harness.distlion_trainer(config),
                harness.adamw_ddp_trainer(config, deferred=True, name="adamw_ddp_phase")]
    for trainer in trainers:  # warm-up: allocations, lookup tables
        harness.timed_steps(trainer, batch, 2)
    stages = {trainer.name: breakdown(trainer, batch, args.steps) for trainer in trainers}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, stages)
    harness.finish_worker(args.result, {"world_size": world_size, "per_rank": everyone})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_loopback_workload_arguments(parser)
    parser.add_argument("--steps", type=harness.positive_int, default=10)
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.world_size, args.steps = "tiny", 2, 2
    if args.worker:
        return worker(args)
    if args.world_size < 2:
        parser.error(f"--world_size {args.world_size}: use at least 2 ranks")
    worker_args = ["--size", args.size, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                   "--steps", str(args.steps)]
    measured = harness.launch_local(__spec__.name, worker_args, args.world_size, timeout=600)
    ranks = measured["per_rank"]
    # The mean over ranks of each rank's median: every rank runs every stage.
    stages = {name: {stage: statistics.mean(r[name].get(stage, 0.0) for r in ranks) for stage in ranks[0][name]}
              for name in ranks[0]}
    config = harness.MODEL_SIZES[args.size]
    print(f"\n{args.world_size} ranks, gloo loopback, {config.num_parameters:,} parameters "
          f"(ms per step, mean over ranks of per-rank medians)")
    for name, times in stages.items():
        print(f"{name}: {times['total']:.1f} ms")
        for stage, ms in sorted(times.items(), key=lambda item: -item[1]):
            if stage != "total":
                print(f"  {stage:24s} {ms:8.2f}  {100 * ms / times['total']:5.1f}%")
    payload = {"model": args.size, "num_parameters": config.num_parameters, "world_size": args.world_size,
               "steps": args.steps, "stages_ms": stages, "per_rank_ms": ranks}
    harness.write_results(f"step_breakdown-{args.size}", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
