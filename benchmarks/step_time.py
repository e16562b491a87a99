"""Step time on loopback gloo: DistLion against DDP all-reduce + foreach AdamW, same run.

4 local ranks (gloo over loopback, where bandwidth is nearly free, so this measures
the cost of DistLion's packing, voting and applying against AdamW's all-reduce and
update). A GPT of 3.89M parameters by default (``--size medium``: 24.2M). Per step:

- phase: the optimizer-plus-communication phase. DistLion: ``optimizer.step()``
  (pack, exchange, vote, apply), with Lion's step and with the scaled step
  (``vote_ema_beta=0.9``, ``distlion_scaled``: the apply also updates an fp32 EMA).
  AdamW: DDP's bucket all-reduces run after backward, then ``AdamW.step()`` (see
  ``benchmarks/harness.py``).
- step: the whole step, forward + backward + phase; AdamW's is DDP as users run it,
  all-reduce overlapped with backward.

Medians over interleaved rounds; the ratios are AdamW / DistLion (above 1: DistLion
faster). docs/design.md §5 target: phase no slower than AdamW + DDP, aim 1.5x faster::

    python -m benchmarks.step_time                  # 3.89M params, 4 ranks (~2 min)
    python -m benchmarks.step_time --size medium    # 24.2M params
    python -m benchmarks.step_time --lion_k         # also Lion-K's k="dead_zone" and k="top"
    python -m benchmarks.step_time --smoke
"""

from __future__ import annotations

import argparse

from benchmarks import harness

TRAINERS = ("distlion", "distlion_scaled", "adamw_ddp", "adamw_ddp_phase")


LION_K = ("dead_zone", "top")  # --lion_k adds DistLion with these k (distlion_dead_zone, distlion_top)


def build_trainers(config, exchange: str = "auto", lion_k: bool = False) -> list[harness.Trainer]:
    """DistLion (Lion's step and the scaled step), DDP + AdamW as users run it, and the same with its
    all-reduce in the phase; with ``lion_k``, DistLion with Lion-K's ternary rules too."""
    return [harness.distlion_trainer(config, exchange=exchange),
            harness.distlion_trainer(config, exchange=exchange, vote_ema_beta=0.9, name="distlion_scaled"),
            *[harness.distlion_trainer(config, exchange=exchange, k=k, name=f"distlion_{k}")
              for k in (LION_K if lion_k else ())],
            harness.adamw_ddp_trainer(config),
            harness.adamw_ddp_trainer(config, deferred=True, name="adamw_ddp_phase")]


def ratios(timings: dict) -> dict:
    """AdamW / DistLion for the phase and the whole step (above 1: DistLion is faster)."""
    lion = timings["distlion"]
    return {"phase_adamw_over_distlion": timings["adamw_ddp_phase"]["phase_s"] / lion["phase_s"],
            "phase_adamw_over_distlion_scaled": timings["adamw_ddp_phase"]["phase_s"]
            / timings["distlion_scaled"]["phase_s"],
            "step_adamw_over_distlion": timings["adamw_ddp"]["step_s"] / lion["step_s"],
            "bytes_adamw_over_distlion": timings["adamw_ddp"]["bytes_sent_per_step"] / lion["bytes_sent_per_step"],
            **{key: value for k in LION_K if f"distlion_{k}" in timings for key, value in (
                (f"phase_{k}_over_sign", timings[f"distlion_{k}"]["phase_s"] / lion["phase_s"]),
                (f"bytes_{k}_over_sign", timings[f"distlion_{k}"]["bytes_sent_per_step"]
                 / lion["bytes_sent_per_step"]))}}


def print_timings(timings: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'trainer':18s} {'phase ms':>9} {'step ms':>9} {'compute ms':>11} {'bytes/step/rank':>16}")
    for name, t in timings.items():
        print(f"{name:18s} {t['phase_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} {t['compute_s'] * 1e3:11.1f} "
              f"{t['bytes_sent_per_step']:16,.0f}")
    r = ratios(timings)
    for k in LION_K:
        if f"distlion_{k}" in timings:
            print(f"k={k!r} / k='sign': phase {r[f'phase_{k}_over_sign']:.2f}x, "
                  f"bytes {r[f'bytes_{k}_over_sign']:.2f}x")
    print(f"AdamW + DDP / DistLion: phase {r['phase_adamw_over_distlion']:.2f}x, "
          f"whole step {r['step_adamw_over_distlion']:.2f}x, bytes {r['bytes_adamw_over_distlion']:.1f}x; "
          f"phase with the scaled step (vote_ema_beta 0.9) {r['phase_adamw_over_distlion_scaled']:.2f}x")


def worker(args: argparse.Namespace) -> None:
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    batch = harness.make_batch(config, args.batch_size, args.seq_len, rank)
    timings = harness.interleaved(build_trainers(config, lion_k=args.lion_k), batch, warmup=args.warmup,
                                  steps=args.steps,
                                  rounds=args.rounds)
    harness.finish_worker(args.result, {"world_size": world_size, "timings": timings})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_loopback_workload_arguments(parser)
    parser.add_argument("--warmup", type=harness.positive_int, default=3)
    parser.add_argument("--steps", type=harness.positive_int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=harness.positive_int, default=3)
    parser.add_argument("--lion_k", action="store_true", help="also time k='dead_zone' and k='top' (Lion-K)")
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.world_size, args.warmup, args.steps, args.rounds = "tiny", 2, 1, 2, 1
    worker_args = ["--size", args.size, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--rounds", str(args.rounds),
                   *(["--lion_k"] if args.lion_k else [])]
    if args.worker:
        return worker(args)
    if args.world_size < 2:
        parser.error(f"--world_size {args.world_size}: use at least 2 ranks")
    measured = harness.launch_local(__spec__.name, worker_args, args.world_size, timeout=900)
    config = harness.MODEL_SIZES[args.size]
    title = (f"{args.world_size} ranks, gloo loopback, GPT of {config.num_parameters:,} parameters, batch "
             f"{args.batch_size}x{args.seq_len} per rank (medians)")
    print_timings(measured["timings"], title)
    payload = {"model": args.size, "num_parameters": config.num_parameters, "world_size": args.world_size,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "steps_per_round": args.steps,
               "rounds": args.rounds, "timings": measured["timings"], "ratios": ratios(measured["timings"])}
    harness.write_results(f"step_time-{args.size}{'-lion_k' if args.lion_k else ''}", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
