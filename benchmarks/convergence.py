"""Convergence at equal steps: DistLion (majority, average, nodes of 2) against global Lion and AdamW.

The demo's task (byte-level GPT on the Python standard library's source, 4 local
workers, ``launch.train`` defaults) for several seeds; each run is one torchrun job
with the optimizer's own default hyper-parameters (Lion guidance: see launch/recipe.py). The
seed sets the initial weights and the data order, identical across optimizers.
Prints the final validation loss of every run, the mean and spread (sample standard
deviation, min-max) per optimizer, and the gap to AdamW::

    python -m benchmarks.convergence                       # 4 optimizers x 3 seeds
    python -m benchmarks.convergence --seeds 0 1 --steps 200
    python -m benchmarks.convergence --smoke               # tiny model, 1 seed, 1 worker
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks import harness
from launch.recipe import SMOKE_ARGS, run_training

VARIANTS = {  # name -> launch.train arguments
    "distlion_majority": ["--optimizer", "distlion", "--vote", "majority"],
    "distlion_average": ["--optimizer", "distlion", "--vote", "average"],
    "distlion_2x2": ["--optimizer", "distlion", "--vote", "majority", "--ranks_per_node", "2"],  # nodes of 2 vote
    "lion_global": ["--optimizer", "lion"],
    "adamw": ["--optimizer", "adamw"],
}
BASELINE = "adamw"


def spread(losses: list[float]) -> dict:
    return {"mean": statistics.mean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "min": min(losses), "max": max(losses), "n": len(losses)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", choices=sorted(VARIANTS), nargs="+", default=list(VARIANTS))
    parser.add_argument("--workers", type=harness.positive_int, default=4)
    parser.add_argument("--steps", type=harness.positive_int, default=None, help="default: launch.train's")
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    # Validation every 50 steps: the final loss is the result, the curve needs fewer points than the demo's.
    extra = SMOKE_ARGS if args.smoke else ["--eval_interval", "50"]
    if args.smoke:  # one process per run: launch.train's distributed paths have tests of their own
        args.seeds, args.workers = args.seeds[:1], 1
        args.variants = [v for v in args.variants if "--ranks_per_node" not in VARIANTS[v]]
    if "distlion_2x2" in args.variants and args.workers % 2:
        parser.error(f"--workers {args.workers}: distlion_2x2 needs an even number of workers (nodes of 2)")
    extra += ["--steps", str(args.steps)] if args.steps is not None else []

    finals: dict[str, dict[int, float]] = {v: {} for v in args.variants}
    curves: dict[str, dict[int, list]] = {v: {} for v in args.variants}
    settings: dict[str, dict] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                metrics = run_training([*VARIANTS[variant], "--seed", str(seed), "--no_progress", *extra],
                                       args.workers, os.path.join(tmp, f"{variant}-{seed}"))
                finals[variant][seed] = metrics["final_val_loss"]
                curves[variant][seed] = [(h["step"], h["val_loss"]) for h in metrics["history"]]
                settings[variant] = {k: metrics["config"].get(k) for k in (
                    "lr", "weight_decay", "betas", "embedding_lr_scale", "vote_ema_beta", "steps", "batch_size",
                    "block_size", "n_layer", "n_embd")}
                settings[variant]["bytes_sent_per_step"] = metrics["bytes_sent_per_step"]
                stats = metrics.get("comm_stats") or {}
                settings[variant]["inter_node_bytes_per_step"] = stats.get("inter_node_bytes_per_step")
    elapsed = time.perf_counter() - start

    summary = {v: spread(list(finals[v].values())) for v in args.variants}
    base = summary.get(BASELINE)
    print(f"\nFinal validation loss (nats/byte), {args.workers} workers, seeds {args.seeds}")
    print(f"{'optimizer':18s} " + " ".join(f"{'seed ' + str(s):>9}" for s in args.seeds)
          + f" {'mean':>8} {'std':>7} {'min-max':>15} {'vs AdamW':>9}")
    for v in args.variants:
        s = summary[v]
        gap = f"{100 * (s['mean'] / base['mean'] - 1):+.2f}%" if base else ""
        if base:
            s["mean_vs_adamw_percent"] = 100 * (s["mean"] / base["mean"] - 1)
        print(f"{v:18s} " + " ".join(f"{finals[v][seed]:9.4f}" for seed in args.seeds)
              + f" {s['mean']:8.4f} {s['std']:7.4f} {s['min']:7.4f}-{s['max']:.4f} {gap:>9}")
    print(f"({elapsed:.0f} s)")
    payload = {"workers": args.workers, "seeds": args.seeds, "settings": settings, "summary": summary,
               "final_val_loss": {v: {str(k): x for k, x in d.items()} for v, d in finals.items()},
               "curves": {v: {str(k): c for k, c in d.items()} for v, d in curves.items()},
               "wall_time_s": elapsed}
    harness.write_results("convergence", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
