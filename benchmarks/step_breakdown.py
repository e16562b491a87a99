"""Where the optimizer-plus-communication phase spends its time, stage by stage.

Times every stage of DistLion's step alone, on N loopback gloo ranks, at the size of a
GPT's parameters: the kernels (``distlion.kernels.kernels_for("cpu")``: non-finite
check, pack, vote, momentum update, unpack + apply) and the two-phase exchange's
collectives (all_to_all of the packed signs, all_gather of the voted chunks), next to
AdamW + DDP's: the fp32 all-reduce of the gradients and the foreach AdamW update.
Medians over repeats; the stages are what ``DistLion.step()`` runs, called one by one,
so their sum is close to, not exactly, the measured phase of ``step_time.py``::

    python benchmarks/step_breakdown.py                  # 3.89M params, 4 ranks
    python benchmarks/step_breakdown.py --size medium    # 24.2M params
    python benchmarks/step_breakdown.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from distlion.comm.exchange import FLAG_BYTES  # noqa: E402
from distlion.kernels import kernels_for  # noqa: E402
from distlion.layout import COORDS_PER_WORD  # noqa: E402
from launch.model import GPT  # noqa: E402


def _median_ms(fn, repeats: int, barrier: bool) -> float:
    fn()  # warm-up: allocations, lookup tables
    times = []
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worker(args: argparse.Namespace) -> None:
    rank, n = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    multiple = COORDS_PER_WORD * n
    d = -(-config.num_parameters // multiple) * multiple  # padded like a DistLion bucket
    chunk = d // 8 // n
    kernels = kernels_for(torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    grads = torch.randn(d, generator=generator)
    momentum = torch.randn(d, generator=generator)
    params = torch.randn(d, generator=generator)
    bits = torch.empty(d // 8, dtype=torch.uint8)
    send = torch.zeros(n, chunk + FLAG_BYTES, dtype=torch.uint8)
    recv = torch.empty_like(send)
    packed = torch.randint(0, 256, (n, chunk), dtype=torch.uint8, generator=generator)
    chunk_vote = torch.empty(1, chunk, dtype=torch.uint8)
    gathered = torch.empty(n, 1, chunk, dtype=torch.uint8)
    voted = torch.randint(0, 256, (d // 8,), dtype=torch.uint8, generator=generator)
    model = GPT(config)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    flat_grads = torch.randn(config.num_parameters, generator=generator)

    r = args.repeats
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    distlion = {
        "gather grads into the bucket (copy)": _median_ms(lambda: params.copy_(grads), r, False),
        "non-finite check": _median_ms(lambda: kernels.nonfinite(grads), r, False),
        "pack signs": _median_ms(lambda: kernels.pack_signs(grads, momentum, bits, beta1=0.9, parity=1), r, False),
        "all_to_all packed signs": _median_ms(lambda: dist.all_to_all_single(recv, send), r, True),
        "majority vote (own chunk)": _median_ms(
            lambda: kernels.majority_vote(packed, chunk_vote[0], casting_rank=0), r, False),
        "all_gather voted chunks": _median_ms(
            lambda: all_gather(gathered.view(-1), chunk_vote.view(-1)), r, True),
        "update momentum": _median_ms(lambda: kernels.update_momentum(grads, momentum, beta2=0.99), r, False),
        "unpack + apply": _median_ms(lambda: kernels.apply_majority(params, voted, lr=1e-4, weight_decay=0.1), r,
                                     False),
    }
    baseline = {
        "all_reduce fp32 gradients": _median_ms(lambda: dist.all_reduce(flat_grads), r, True),
        "AdamW foreach step": _median_ms(adamw.step, r, False),
    }
    harness.finish_worker(args.result, {"world_size": n, "padded_numel": d, "distlion_ms": distlion,
                                        "adamw_ddp_ms": baseline})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(harness.MODEL_SIZES), default="small")
    parser.add_argument("--world_size", type=harness.positive_int, default=4)
    parser.add_argument("--repeats", type=harness.positive_int, default=15)
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.world_size, args.repeats = "tiny", 2, 2
    if args.worker:
        return worker(args)
    if args.world_size < 2:
        parser.error(f"--world_size {args.world_size}: use at least 2 ranks")
    measured = harness.launch_local(os.path.abspath(__file__), ["--size", args.size, "--repeats", str(args.repeats)],
                                    args.world_size, timeout=600)
    config = harness.MODEL_SIZES[args.size]
    print(f"\n{args.world_size} ranks, gloo loopback, {config.num_parameters:,} parameters (rank 0, median ms)")
    for title, stages in (("DistLion step (two-phase, majority)", measured["distlion_ms"]),
                          ("AdamW + DDP", measured["adamw_ddp_ms"])):
        print(f"{title}: {sum(stages.values()):.1f} ms")
        for stage, ms in stages.items():
            print(f"  {stage:38s} {ms:8.2f}")
    payload = {"model": args.size, "num_parameters": config.num_parameters, "world_size": args.world_size,
               "repeats": args.repeats, **{k: v for k, v in measured.items() if k != "world_size"}}
    harness.write_results(f"step_breakdown-{args.size}", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
