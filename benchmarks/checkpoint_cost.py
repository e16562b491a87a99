"""What crash-safe checkpoints and a resume on another topology cost, against their baselines.

    python -m benchmarks.checkpoint_cost --size medium --rounds 5

Two measurements, each against a baseline timed in the same launch, interleaved round by
round (the machines are shared: only the ratios mean anything):

- **save**: ``distlion.save`` (every rank's file written to a temporary name, fsync'd and
  renamed, its CRC-32 taken, the ranks meeting through the store, rank 0's manifest) against
  ``torch.save(opt.state_dict(), path)`` per rank, the save of a plain per-rank file, which
  returns once the bytes are in the page cache. A third save, the same ``distlion.save``
  with ``fsync`` made a no-op, splits the cost: what is left is the wait for the disk. The
  time of a save is its slowest rank's.
- **resume**: ``distlion.load`` on the saved topology (each rank reads and verifies its own
  file) against a resume on another one: the 4-rank checkpoint loaded by 2 ranks and a
  2-rank one by 4 ranks (each rank reads the saved voters its rule needs: every one for
  the default "mean"). Each resume builds a fresh DistLion and times ``distlion.load`` on
  every rank; the time is the slowest rank's.

The model is a byte-level GPT of ``--size`` (``medium``: 24.2M parameters) with fp32
parameters, so the state is the fp32 momentum, 4 bytes per parameter per rank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import distlion
from benchmarks.harness import (MODEL_SIZES, add_common_arguments, finish_worker, join_group, launch_local,
                                positive_int, write_results)
from distlion import DistLion
from distlion.checkpoint import files
from launch.model import GPT


def _optimizer(size: str) -> DistLion:
    torch.manual_seed(0)
    model = GPT(MODEL_SIZES[size])
    optimizer = DistLion(model.parameters(), lr=1e-4)
    for param in model.parameters():  # a momentum that is not all zeros
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _timed(action) -> float:
    dist.barrier()
    start = time.perf_counter()
    action()
    return _slowest(time.perf_counter() - start)


def save_worker(args: argparse.Namespace) -> None:
    """Every round: a plain torch.save of each rank's state, then distlion.save, in fresh directories."""
    rank, world_size = join_group()
    optimizer = _optimizer(args.size)
    plain, safe, unsynced = [], [], []
    sync = files.os.fsync
    for round_ in range(args.rounds):
        base = os.path.join(args.dir, f"round{round_}")
        os.makedirs(os.path.join(base, "plain"), exist_ok=True)
        plain.append(_timed(lambda: torch.save(optimizer.state_dict(),
                                               os.path.join(base, "plain", f"rank{rank}.pt"))))
        safe.append(_timed(lambda: distlion.save(optimizer, os.path.join(base, "safe"))))
        files.os.fsync = lambda descriptor: None  # the same save without waiting for the disk: what fsync costs
        try:
            unsynced.append(_timed(lambda: distlion.save(optimizer, os.path.join(base, "unsynced"))))
        finally:
            files.os.fsync = sync
        dist.barrier()
        if rank == 0 and round_ < args.rounds - 1:
            shutil.rmtree(base)
    finish_worker(args.result, {"plain_save_s": plain, "distlion_save_s": safe, "unsynced_save_s": unsynced,
                                "state_bytes_per_rank": os.path.getsize(os.path.join(base, "plain", "rank0.pt"))})


def resume_worker(args: argparse.Namespace) -> None:
    """Every round: distlion.load of ``--source`` into a fresh DistLion, timed."""
    join_group()
    seconds = []
    for _ in range(args.rounds):
        optimizer = DistLion(GPT(MODEL_SIZES[args.size]).parameters(), lr=1e-4)
        seconds.append(_timed(lambda: distlion.load(optimizer, args.source)))
    finish_worker(args.result, {"load_s": seconds})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="medium")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--phase", choices=["save", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (save_worker if args.phase == "save" else resume_worker)(args)
        return {}
    if args.smoke:
        args.size, args.rounds = "tiny", 2
    module = __spec__.name if __spec__ else "benchmarks.checkpoint_cost"
    common = ["--size", args.size, "--rounds", str(args.rounds)]
    timeout = 1800
    payload: dict = {"size": args.size, "parameters": sum(p.numel() for p in GPT(MODEL_SIZES[args.size]).parameters()),
                     "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        saves = {}
        for world_size in (4, 2):
            directory = os.path.join(tmp, f"n{world_size}")
            print(f"save: {world_size} ranks, {args.rounds} rounds ...", file=sys.stderr, flush=True)
            saves[world_size] = launch_local(module, [*common, "--phase", "save", "--dir", directory], world_size,
                                             timeout)
            saves[world_size]["checkpoint"] = os.path.join(directory, f"round{args.rounds - 1}", "safe")
        plain, safe, unsynced = (saves[4][key] for key in ("plain_save_s", "distlion_save_s", "unsynced_save_s"))
        payload["save_n4"] = {"plain_s": plain, "distlion_s": safe, "unsynced_s": unsynced,
                              "plain_median_s": statistics.median(plain),
                              "distlion_median_s": statistics.median(safe),
                              "unsynced_median_s": statistics.median(unsynced),
                              "ratio": statistics.median(safe) / statistics.median(plain),
                              "unsynced_ratio": statistics.median(unsynced) / statistics.median(plain),
                              "state_bytes_per_rank": saves[4]["state_bytes_per_rank"]}
        resumes = {}
        for name, source, world_size in (("same_n4", 4, 4), ("4_to_2", 4, 2), ("same_n2", 2, 2), ("2_to_4", 2, 4)):
            print(f"resume {name} ...", file=sys.stderr, flush=True)
            result = launch_local(module, [*common, "--phase", "resume", "--source", saves[source]["checkpoint"]],
                                  world_size, timeout)
            resumes[name] = {"load_s": result["load_s"], "median_s": statistics.median(result["load_s"])}
        resumes["4_to_2"]["ratio_to_same_n2"] = resumes["4_to_2"]["median_s"] / resumes["same_n2"]["median_s"]
        resumes["2_to_4"]["ratio_to_same_n4"] = resumes["2_to_4"]["median_s"] / resumes["same_n4"]["median_s"]
        payload["resume"] = resumes
    save = payload["save_n4"]
    print(f"\n{payload['parameters'] / 1e6:.1f}M parameters, {save['state_bytes_per_rank']:,} state bytes per rank")
    print(f"save (N = 4):  torch.save {save['plain_median_s']:.3f} s   distlion.save {save['distlion_median_s']:.3f} s"
          f"   ratio {save['ratio']:.2f}x")
    print(f"               without fsync {save['unsynced_median_s']:.3f} s   ratio {save['unsynced_ratio']:.2f}x "
          f"(the rest is the wait for the disk)")
    for name in ("same_n2", "4_to_2", "same_n4", "2_to_4"):
        entry = resumes[name]
        ratio = entry.get("ratio_to_same_n2", entry.get("ratio_to_same_n4"))
        print(f"resume {name:8s} {entry['median_s']:.3f} s" + (f"   ratio to the same-topology resume {ratio:.2f}x"
                                                               if ratio else ""))
    write_results("checkpoint_cost", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
