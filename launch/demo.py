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
    python -m launch.demo --ranks_per_node 2   # a third run: the 4 workers as 2 nodes of 2

With ``--ranks_per_node G`` a third run trains DistLion with nodes of G workers (each
node votes as one worker, its G workers share the optimizer state); its bytes in the
report are the inter-node bytes (the vote), not the reduce-scatter and all-gather
inside a node, which on a cluster ride the node's fast link.

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
    parser.add_argument("--ranks_per_node", type=int, default=None, metavar="G",
                        help="also train DistLion with the workers as nodes of G (reported by inter-node bytes)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: use at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: use at least 1")
    nodes = args.ranks_per_node
    if nodes is not None and not (1 < nodes < args.workers and args.workers % nodes == 0):
        parser.error(f"--ranks_per_node {nodes}: use a divisor of --workers {args.workers} between 2 and "
                     f"{args.workers // 2}, so that at least 2 nodes vote")
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data!r}: no such file")
    common = ["--seed", str(args.seed)] + (SMOKE_ARGS if args.smoke else [])
    common += ["--steps", str(args.steps)] if args.steps is not None else []
    common += ["--data", os.path.abspath(args.data)] if args.data is not None else []  # training runs in the repo root

    start = time.perf_counter()
    plan = {"distlion": ["--optimizer", "distlion", "--ranks_per_node", "1"], "adamw": ["--optimizer", "adamw"]}
    if nodes is not None:
        plan["distlion_nodes"] = ["--optimizer", "distlion", "--ranks_per_node", str(nodes)]
    runs = {}
    for name, train_args in plan.items():
        print(f"\n=== {name}: {args.workers} workers ===", flush=True)
        runs[name] = run_training([*train_args, *common], args.workers, os.path.join(args.out, name))
    elapsed = time.perf_counter() - start
    report = write_report(runs, args.out, extra={"demo_wall_time_s": elapsed, "smoke": args.smoke})

    print("\n" + format_table(report["comparison"]))
    lion = report["comparison"]["distlion"]
    ratio = lion.get("bytes_ratio_adamw_over_this")
    sent = f"DistLion sent {ratio:.1f}x fewer bytes than AdamW + DDP" if ratio else "One worker sends nothing"
    print(f"\n{sent}; final validation loss {lion['val_loss_vs_adamw_percent']:+.2f}% relative to AdamW. "
          f"Parameters identical on all ranks: {lion['parameters_identical']}.")
    if nodes is not None:
        node_run = report["comparison"]["distlion_nodes"]
        print(f"{node_run['label']}: final validation loss {node_run['val_loss_vs_adamw_percent']:+.2f}% relative "
              f"to AdamW; {node_run['bytes_ratio_adamw_over_this']:.1f}x fewer bytes counting only those sent "
              f"between nodes.")
    print(f"Demo wall time {elapsed:.0f} s. Report: {os.path.join(args.out, 'report.json')}"
          + (f", plot: {os.path.join(args.out, 'report.png')}" if report["plotted"] else
             " (install matplotlib for report.png)"))
    return report


if __name__ == "__main__":
    main()
