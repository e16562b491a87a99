"""Fault tolerance on torchft: what a lost replica group costs, and what the quorum costs when none is lost.

Every run has 3 voters on loopback (gloo) and, for ``distlion.torchft``, torchft's
Lighthouse binary (``torchft_lighthouse``) keeping the quorum of 3 replica groups of one
rank each. A voter trains a byte-level GPT (``harness.MODEL_SIZES``) on random batches of
its own.

- **overhead**: ``FaultTolerantDistLion`` over the 3 groups against plain ``DistLion`` on 3
  torchrun ranks, with the same exchange (all-gather), model and batches. Reported: the
  median time of a whole step (zero_grad with its quorum, forward, backward, the vote and
  ``should_commit``) after ``--warmup`` steps, the slowest voter's, rounds interleaved.
- **failure**: one group is SIGKILLed after step ``--kill_at``; the survivors train on to
  ``--steps``. Reported: the steps lost (the survivors' attempts that were not committed)
  and the wall time lost (from the last committed step before the failure to the first
  after it, minus a median step). Against it, checkpoint-restart every C steps: on average
  C/2 steps recomputed plus a restart, taken here as a group's time from its launch to its
  first committed step (measured in the same run: start-up, the first quorum, one step; the
  checkpoint's own load is not in it). The group dies between two steps; one that dies
  inside a step costs that step too (tests/test_torchft.py).

::

    python -m benchmarks.fault_tolerance                  # 24.2M overhead, 3.89M failure, 2 rounds
    python -m benchmarks.fault_tolerance --smoke          # tiny model, a few steps

Writes ``benchmarks/results/fault_tolerance-DATE.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch

from benchmarks import harness

CHECKPOINT_EVERY = (50, 100, 500)  # C: checkpoint-restart every C steps, for the comparison
GROUPS = 3


# ------------------------------------------------------------------------------ workers

def group_worker(args: argparse.Namespace) -> None:
    """One replica group of one rank: train, record every attempted step, write them to ``args.result``."""
    start = time.perf_counter()
    from torch.distributed import TCPStore  # noqa: I001 (the workers' imports: the orchestrator needs none)
    from torchft import Manager, ProcessGroupGloo

    from distlion.torchft import FaultTolerantDistLion

    torch.set_num_threads(1)
    store = TCPStore("localhost", args.store_port, is_master=True, wait_for_workers=False)  # noqa: F841
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=30)), min_replica_size=1,
                      load_state_dict=None, state_dict=None, use_async_quorum=False,
                      replica_id=f"group_{args.replica}", store_addr="localhost", store_port=args.store_port,
                      rank=0, world_size=1, lighthouse_addr=args.lighthouse, hostname="localhost",
                      timeout=timedelta(seconds=30), quorum_timeout=timedelta(seconds=60))
    config = harness.MODEL_SIZES[args.size]
    model = harness._model(config)
    optimizer = FaultTolerantDistLion(manager, model, lr=1e-4, weight_decay=0.1, exchange="all_gather", timeout=30)
    x, y = harness.make_batch(config, args.batch_size, args.seq_len, args.replica)
    records = []
    while manager.current_step() < args.steps:
        begin = time.perf_counter()
        optimizer.zero_grad()
        step = manager.current_step()
        model(x, y)[1].backward()
        optimizer.step()
        end = time.perf_counter()
        records.append({"step": step, "committed": optimizer.quorum.committed, "voters": optimizer.quorum.voters(),
                        "seconds": end - begin, "end": end - start, "wall_end": time.time()})
        with open(args.result, "w") as f:
            json.dump({"records": records}, f)
        if args.die_after is not None and manager.current_step() > args.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
    manager.shutdown(wait=False)
    os._exit(0)


def plain_worker(args: argparse.Namespace) -> None:
    """Plain DistLion on torchrun's ranks: the same model, batches and exchange; every step timed."""
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    model = harness._model(config)
    from distlion import DistLion
    optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1, exchange="all_gather")
    x, y = harness.make_batch(config, args.batch_size, args.seq_len, rank)
    seconds = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        optimizer.zero_grad()
        model(x, y)[1].backward()
        optimizer.step()
        seconds.append(time.perf_counter() - begin)
    times = [None] * world_size
    torch.distributed.all_gather_object(times, seconds)
    harness.finish_worker(args.result, {"seconds": times})


# --------------------------------------------------------------------------- orchestration

def run_groups(args: argparse.Namespace, size: str, steps: int, kill_at: int | None) -> list[list[dict]]:
    """Train ``GROUPS`` replica groups (group 2 SIGKILLed after ``kill_at``); every group's records."""
    with tempfile.TemporaryDirectory() as tmp, harness.torchft_lighthouse() as address:
        outs = [os.path.join(tmp, f"group{i}.json") for i in range(GROUPS)]
        launched = time.time()
        processes = [subprocess.Popen(
            [sys.executable, "-m", __spec__.name, "--worker", "--role", "group", "--replica", str(i), "--lighthouse",
             address, "--store_port", str(harness.free_port()), "--size", size, "--steps", str(steps), "--result",
             outs[i], "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
             *(["--die_after", str(kill_at)] if kill_at is not None and i == GROUPS - 1 else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=harness.REPO) for i in range(GROUPS)]
        for i, process in enumerate(processes):
            _, error = process.communicate(timeout=args.timeout)
            killed = kill_at is not None and i == GROUPS - 1
            if process.returncode != (-signal.SIGKILL if killed else 0):
                raise SystemExit(f"group {i} ended with {process.returncode}:\n{error[-3000:]}")
        runs = []
        for out in outs:
            with open(out) as f:
                records = json.load(f)["records"]
            for record in records:
                record["since_launch_s"] = record.pop("wall_end") - launched
            runs.append(records)
        return runs


def overhead(args: argparse.Namespace) -> dict:
    """Median whole-step time of the slowest voter, torchft against plain, ``args.rounds`` interleaved rounds."""
    rounds = []
    for round_index in range(args.rounds):
        runs = run_groups(args, args.overhead_size, args.warmup + args.timed_steps, None)
        ft = max(statistics.median(r["seconds"] for r in run[args.warmup:] if r["committed"]) for run in runs)
        plain = harness.launch_local(__spec__.name, ["--role", "plain", "--size", args.overhead_size, "--steps",
                                                     str(args.warmup + args.timed_steps), "--batch_size",
                                                     str(args.batch_size), "--seq_len", str(args.seq_len)],
                                     GROUPS, args.timeout)
        plain_s = max(statistics.median(seconds[args.warmup:]) for seconds in plain["seconds"])
        rounds.append({"round": round_index, "torchft_step_s": ft, "plain_step_s": plain_s, "ratio": ft / plain_s})
        print(f"overhead round {round_index}: torchft {ft * 1e3:.1f} ms, plain {plain_s * 1e3:.1f} ms per step "
              f"({ft / plain_s:.3f}x)", flush=True)
    return {"size": args.overhead_size, "num_parameters": harness.MODEL_SIZES[args.overhead_size].num_parameters,
            "rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds)}


def failure(args: argparse.Namespace) -> dict:
    """Steps and wall time a SIGKILLed group costs the survivors, against checkpoint-restart."""
    runs = run_groups(args, args.failure_size, args.steps, args.kill_at)
    survivors = runs[:GROUPS - 1]
    lost = [sum(1 for r in run if not r["committed"]) for run in survivors]
    wall = []
    for run in survivors:
        committed = [r for r in run if r["committed"]]
        step_s = statistics.median(r["seconds"] for r in committed)
        before = max(r["end"] for r in committed if r["step"] <= args.kill_at)
        after = min(r["end"] for r in committed if r["step"] > args.kill_at)
        wall.append(after - before - step_s)
    step_s = statistics.median(r["seconds"] for run in survivors for r in run if r["committed"])
    restart_s = statistics.median(next(r for r in run if r["committed"])["since_launch_s"] for run in runs)
    restart = {str(c): {"steps_lost": c / 2, "wall_s": restart_s + c / 2 * step_s} for c in CHECKPOINT_EVERY}
    print(f"failure: {max(lost)} step(s) lost, {max(wall):.2f} s lost; checkpoint-restart: restart {restart_s:.2f} s "
          f"+ C/2 steps of {step_s * 1e3:.0f} ms", flush=True)
    return {"size": args.failure_size, "kill_at": args.kill_at, "steps": args.steps, "steps_lost": lost,
            "wall_s_lost": wall, "median_step_s": step_s, "restart_s": restart_s, "checkpoint_restart": restart,
            "voters_after": [run[-1]["voters"] for run in survivors]}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overhead_size", choices=sorted(harness.MODEL_SIZES), default="medium")
    parser.add_argument("--failure_size", choices=sorted(harness.MODEL_SIZES), default="small")
    parser.add_argument("--warmup", type=harness.positive_int, default=3)
    parser.add_argument("--timed_steps", type=harness.positive_int, default=8)
    parser.add_argument("--rounds", type=harness.positive_int, default=2)
    parser.add_argument("--steps", type=harness.positive_int, default=30, help="failure run: steps to train")
    parser.add_argument("--kill_at", type=int, default=10, help="failure run: group 2 dies after this step")
    parser.add_argument("--batch_size", type=harness.positive_int, default=2)
    parser.add_argument("--seq_len", type=harness.positive_int, default=64)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    # the workers'
    parser.add_argument("--role", choices=("group", "plain"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--replica", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lighthouse", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store_port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--die_after", type=int, default=None, help=argparse.SUPPRESS)
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return group_worker(args) if args.role == "group" else plain_worker(args)
    if args.smoke:
        args.overhead_size = args.failure_size = "tiny"
        args.warmup, args.timed_steps, args.rounds, args.steps, args.kill_at = 1, 2, 1, 8, 3
    payload = {"groups": GROUPS, "overhead": overhead(args), "failure": failure(args),
               "settings": {"warmup": args.warmup, "timed_steps": args.timed_steps, "batch_size": args.batch_size,
                            "seq_len": args.seq_len, "exchange": "all_gather", "lighthouse":
                            "min_replicas 2, join_timeout_ms 2000, quorum_tick_ms 50, heartbeat_timeout_ms 5000"}}
    harness.write_results("fault_tolerance", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
