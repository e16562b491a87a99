"""Bytes per step per rank: DistLion's sign exchanges against DDP's gradient all-reduce.

For N = 2, 4, 8 local gloo ranks and a GPT of d parameters, runs a few training steps
with each of

- DistLion, two-phase and all-gather exchange, majority and average vote: bytes from
  ``optimizer.comm_stats`` (the payload of every collective it makes); and the momentum
  sync at every step, from which the defaults' row (``momentum_sync_every=32``: the vote
  plus one sync's bytes over 32 steps) is computed;
- DDP with fp32 and with bf16 gradients: bytes from a counting comm hook wrapped around
  DDP's own all-reduce hooks (2*(N-1)/N of each bucket, what a ring all-reduce sends);

and prints bytes per step per rank, the ratio DDP fp32 / each, and the ideal values
(DistLion two-phase 2(N-1)/N * d/8, all-gather (N-1) * d/8, DDP fp32 2(N-1)/N * 4d)::

    python -m benchmarks.comm_volume                 # d = 24.2M, N = 2 4 8 (~3 min)
    python -m benchmarks.comm_volume --size large    # d = 85.2M
    python -m benchmarks.comm_volume --smoke         # tiny model, N = 2
"""

from __future__ import annotations

import argparse
import gc

from benchmarks import harness

STEPS = 2
CONFIGS = {  # name -> (kind, options)
    "distlion_two_phase_majority": ("distlion", {"exchange": "two_phase", "vote": "majority"}),
    "distlion_all_gather_majority": ("distlion", {"exchange": "all_gather", "vote": "majority"}),
    "distlion_two_phase_average": ("distlion", {"exchange": "two_phase", "vote": "average"}),
    "distlion_all_gather_average": ("distlion", {"exchange": "all_gather", "vote": "average"}),
    # the defaults' momentum sync, measured at every step; the K = 32 row amortizes it (main)
    "distlion_sync_every_step": ("distlion", {"momentum_sync_every": 1}),
    "ddp_fp32": ("ddp", {"wire_dtype": "fp32"}),
    "ddp_bf16": ("ddp", {"wire_dtype": "bf16"}),
}
BASELINE = "ddp_fp32"
SYNC_EVERY = 32  # DistLion's default momentum_sync_every


def ideal_bytes(name: str, d: int, n: int) -> float:
    """Bytes per rank per step of an ideal implementation (no padding, no flags)."""
    planes = n.bit_length() if name.endswith("average") else 1  # ceil(log2(N+1)) count planes
    if name.startswith("distlion_sync_every_step") or name.startswith("distlion_defaults"):
        vote = ideal_bytes("distlion_two_phase_majority" if n > 2 else "distlion_all_gather_majority", d, n)
        every = 1 if name.startswith("distlion_sync_every_step") else SYNC_EVERY
        return vote + 2 * (n - 1) / n * d * 2 / every  # + a bf16 ring all-reduce of the momentum per sync
    if name.startswith("distlion_two_phase"):
        return (n - 1) / n * d / 8 * (1 + planes)
    if name.startswith("distlion_all_gather"):
        return (n - 1) * d / 8
    return 2 * (n - 1) / n * d * (4 if name == "ddp_fp32" else 2)


def defaults_bytes(measured: dict[str, float], n: int) -> float:
    """The defaults' bytes per step: the vote of the "auto" exchange, plus one momentum sync (measured as
    the sync-every-step run's bytes beyond the vote's) amortized over ``SYNC_EVERY`` steps."""
    vote = measured["distlion_two_phase_majority" if n > 2 else "distlion_all_gather_majority"]
    return vote + (measured["distlion_sync_every_step"] - vote) / SYNC_EVERY


def worker(args: argparse.Namespace) -> None:
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    batch = harness.make_batch(config, 1, 16, rank)
    bytes_per_step = {}
    for name, (kind, options) in CONFIGS.items():  # one at a time: 8 ranks of a large model fill memory
        trainer = (harness.distlion_trainer(config, name=name, **options) if kind == "distlion"
                   else harness.adamw_ddp_trainer(config, name=name, **options))
        bytes_per_step[name] = harness.timed_steps(trainer, batch, STEPS)["bytes_sent"] / STEPS
        del trainer
        gc.collect()
    harness.finish_worker(args.result, {"world_size": world_size, "bytes_per_step": bytes_per_step})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(harness.MODEL_SIZES), default="medium")
    parser.add_argument("--world_sizes", type=harness.positive_int, nargs="+", default=[2, 4, 8])
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.size, args.world_sizes = "tiny", [2]
    if min(args.world_sizes) < 2:
        parser.error(f"--world_sizes {args.world_sizes}: every N must be at least 2 (N=1 sends nothing)")
    d = harness.MODEL_SIZES[args.size].num_parameters
    rows = []
    for n in args.world_sizes:
        measured = harness.launch_local(__spec__.name, ["--size", args.size], n, timeout=600)
        measured["bytes_per_step"][f"distlion_defaults_k{SYNC_EVERY}"] = defaults_bytes(measured["bytes_per_step"], n)
        for name, sent in measured["bytes_per_step"].items():
            rows.append({"world_size": n, "config": name, "bytes_per_step_per_rank": sent,
                         "ideal_bytes": ideal_bytes(name, d, n),
                         "ratio_ddp_fp32_over_this": measured["bytes_per_step"][BASELINE] / sent})
    print(f"\nBytes per step per rank, GPT of d = {d:,} parameters (measured; ideal = no padding or flags)")
    print(f"{'N':>3}  {'configuration':30s}  {'bytes/step/rank':>16}  {'ideal':>14}  {'DDP fp32 / this':>15}")
    for row in rows:
        print(f"{row['world_size']:>3}  {row['config']:30s}  {row['bytes_per_step_per_rank']:>16,.0f}  "
              f"{row['ideal_bytes']:>14,.0f}  {row['ratio_ddp_fp32_over_this']:>14.2f}x")
    payload = {"num_parameters": d, "model": args.size, "steps": STEPS, "rows": rows}
    harness.write_results("comm_volume", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
