"""The demo: DistLion against AdamW + DDP on 4 local CPU workers, side by side.

Trains the byte-level GPT of ``launch.train`` on the Python standard library's own
source twice with ``torchrun`` (gloo): once with DistLion (majority vote, no DDP) and
once with AdamW + DDP's fp32 gradient all-reduce. Same model, seed, data order and
steps; each optimizer gets its own Lion/AdamW hyper-parameters (see launch/recipe.py).
Then it prints the comparison and writes ``report.json`` and ``report.png`` to ``--out``.
Run it from the repository root::

    python -m launch.demo                      # ~3 minutes on 2 cores
    python -m launch.demo --data my_text.txt   # your own text
    python -m launch.demo --smoke              # a tiny model for a few steps (CI)

``bash launch/demo.sh`` sets up a virtualenv first and runs this.
"""

from __future__ import annotations

import argparse
import os
import time

from launch.recipe import SMOKE_ARGS, run_training
from launch.report import format_table, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="local worker processes (gloo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: launch.train's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="text file to train on (default: the Python standard library's source)")
    parser.add_argument("--out", default=os.path.join("runs", "demo"), metavar="DIR")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks that it all runs")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: use at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: use at least 1")
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data!r}: no such file")
    common = ["--seed", str(args.seed)] + (SMOKE_ARGS if args.smoke else [])
    common += ["--steps", str(args.steps)] if args.steps is not None else []
    common += ["--data", os.path.abspath(args.data)] if args.data is not None else []  # training runs in the repo root

    start = time.perf_counter()
    runs = {}
    for optimizer in ("distlion", "adamw"):
        print(f"\n=== {optimizer}: {args.workers} workers ===", flush=True)
        runs[optimizer] = run_training(["--optimizer", optimizer, *common], args.workers,
                                       os.path.join(args.out, optimizer))
    elapsed = time.perf_counter() - start
    report = write_report(runs, args.out, extra={"demo_wall_time_s": elapsed, "smoke": args.smoke})

    print("\n" + format_table(report["comparison"]))
    lion = report["comparison"]["distlion"]
    ratio = lion.get("bytes_ratio_adamw_over_this")
    sent = f"DistLion sent {ratio:.1f}x fewer bytes than AdamW + DDP" if ratio else "One worker sends nothing"
    print(f"\n{sent}; final validation loss {lion['val_loss_vs_adamw_percent']:+.2f}% relative to AdamW. "
          f"Parameters identical on all ranks: {lion['parameters_identical']}.")
    print(f"Demo wall time {elapsed:.0f} s. Report: {os.path.join(args.out, 'report.json')}"
          + (f", plot: {os.path.join(args.out, 'report.png')}" if report["plotted"] else
             " (install matplotlib for report.png)"))
    return report


if __name__ == "__main__":
    main()
