"""Throughput of the DistLion kernels, each against a plain copy of the same data.

Every op of ``distlion.kernels.contract`` (``apply`` in each of its modes) is timed on
the same number of coordinates d, in the same run as its baseline, so the ratio says how
far a kernel is from the speed of memory:

- on CPU (default): ``cpu_native`` (C), ``torch_fast`` and ``reference`` against a
  ``dst.copy_(src)`` (``clone()`` shown too: it also pays for fresh pages);
- with ``--device cuda``: the Triton kernels (and ``torch_fast`` on CUDA) against a
  device-to-device ``dst.copy_(src)``, then one whole optimizer step on ``--size``
  parameters: ``DistLion`` (single rank) against ``torch.optim.AdamW(fused=True)``, a
  ``torch._foreach`` Lion and a one-kernel fused Lion written in Triton here (the floor:
  it reads p, g, m once and writes p, m).

GB/s counts the fp32 gradient a kernel covers (4 bytes x d), whatever it reads:
the vote kernels read N packed rows of d/8 bytes, and that is the point of them.
"traffic" counts the bytes a kernel must read and write (e.g. 12 per coordinate for
the momentum update), and "bw" sets that against the copy's read + write bandwidth:
how close each kernel runs to the speed of memory.

From the repository root::

    python -m benchmarks.kernels                       # CPU, d = 2**24
    python -m benchmarks.kernels --device cuda --json benchmarks/results/kernels_cuda.json
    python -m benchmarks.kernels --smoke               # tiny sizes, one repeat (CI)
    python -m benchmarks.kernels --threads 1           # steadier when other jobs share the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from distlion.kernels import backend, contract

BETA1, BETA2, LR, WEIGHT_DECAY = 0.9, 0.99, 1e-4, 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; sizes default by device, and --smoke shrinks everything."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--numel", type=int, default=None,
                        help="coordinates per kernel call, a multiple of 64 (default 2**24 on CPU, 2**28 on CUDA)")
    parser.add_argument("--world-size", type=int, default=4, help="rows voted on by the vote kernels (default 4)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per kernel (default 5 CPU, 20 CUDA)")
    parser.add_argument("--size", type=int, default=1_000_000_000,
                        help="parameters in the CUDA optimizer-step comparison (default 1e9)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0,
                        help="DistLion's bucket_cap_mb in the optimizer-step comparison (default 25)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one repeat, to check that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.numel = args.numel or 1 << 16
        args.repeat = args.repeat or 1
        args.size = min(args.size, 1 << 22)
    args.numel = args.numel or (1 << 24 if args.device == "cpu" else 1 << 28)
    args.repeat = args.repeat or (5 if args.device == "cpu" else 20)
    if args.numel % 64 or args.numel <= 0:
        parser.error(f"--numel must be a positive multiple of 64, got {args.numel}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False")
    return args


def timed(fn: Callable[[], object], repeat: int, device: str) -> tuple[float, float]:
    """Return (best, median) seconds of ``repeat`` calls of ``fn``, after one untimed warm-up call.

    The best is what the table shows: on a shared machine other jobs only ever add time.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up: compiles Triton kernels, fills caches and allocator pools
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return min(samples), statistics.median(samples)


def kernel_cases(kernels, numel: int, world_size: int, device: str) -> dict[str, tuple[Callable[[], object], float]]:
    """Return the calls to time, by name, with inputs built once on ``device``: every op of the contract.

    With each call comes the memory traffic it must cause, in bytes per coordinate
    (fp32 = 4, a packed bit = 1/8), so its bandwidth can be set against the copy's.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(numel, device=device, generator=gen)
    momentum = torch.randn(numel, device=device, generator=gen)
    param = torch.randn(numel, device=device, generator=gen)
    master = param.clone()
    vote_ema = torch.zeros_like(param)
    scratch = torch.empty_like(momentum)  # where the new momentum goes (the optimizer's gradient buffer)
    param_bf16 = param.to(torch.bfloat16)
    n_bytes = numel // 8
    packed = torch.randint(0, 256, (world_size, n_bytes), device=device, dtype=torch.uint8, generator=gen)
    vote = torch.empty(1, n_bytes, device=device, dtype=torch.uint8)
    planes = world_size.bit_length()
    counts = torch.empty(planes, n_bytes, device=device, dtype=torch.uint8)
    kernels.vote_counts(packed, counts)
    grads, views = [grad[:numel // 2], grad[numel // 2:]], list(scratch.split(numel // 2))  # two parameters
    bit = 1 / 8
    steps = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    by_op = {
        "pack_grads_and_momentum": {"pack_grads_and_momentum (2 params)": (lambda: kernels.pack_grads_and_momentum(
            grads, views, momentum, vote[0], scratch, beta1=BETA1, beta2=BETA2, parity=0), 12 + bit)},
        "pack_signs_and_momentum": {"pack_signs_and_momentum": (lambda: kernels.pack_signs_and_momentum(
            grad, momentum, vote[0], scratch, beta1=BETA1, beta2=BETA2, parity=0), 12 + bit)},
        "pack_signs_and_check": {"pack_signs_and_check": (lambda: kernels.pack_signs_and_check(
            grad, momentum, vote[0], beta1=BETA1, parity=0), 8 + bit)},
        "update_momentum": {"update_momentum": (lambda: kernels.update_momentum(grad, momentum, beta2=BETA2), 12)},
        "majority_vote": {f"majority_vote (N={world_size})": (
            lambda: kernels.majority_vote(packed, vote[0], casting_rank=0), (world_size + 1) * bit)},
        "vote_counts": {f"vote_counts (N={world_size})": (
            lambda: kernels.vote_counts(packed, counts), (world_size + planes) * bit)},
        "apply": {
            "apply fp32 (majority)": (lambda: kernels.apply(param, vote, voters=1, **steps), 8 + bit),
            "apply bf16+master (majority)": (
                lambda: kernels.apply(param_bf16, vote, voters=1, master=master, **steps), 10 + bit),
            f"apply fp32 (average, N={world_size})": (
                lambda: kernels.apply(param, counts, voters=world_size, **steps), 8 + planes * bit),
            # the scaled step (vote_ema_beta) also reads and writes its fp32 EMA
            "apply fp32 (scaled, majority)": (lambda: kernels.apply(
                param, vote, voters=1, vote_ema=vote_ema, beta=0.9, step=10, **steps), 16 + bit),
        },
    }
    if set(by_op) != set(contract.OPS):
        raise RuntimeError(f"benchmark cases {sorted(by_op)} do not match the contract's ops {sorted(contract.OPS)}")
    return {name: case for op in contract.OPS for name, case in by_op[op].items()}


def bench_kernels(args: argparse.Namespace) -> list[dict]:
    """Time the baseline copy and every kernel of every backend for the device."""
    device, numel = args.device, args.numel
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    names = ("triton_kernels", "torch_fast") if device == "cuda" else ("cpu_native", "torch_fast", "reference")
    impls = {name: backend(name) for name in names}
    fp32_bytes = 4 * numel
    base_seconds, base_median = timed(lambda: dst.copy_(src), args.repeat, device)
    copy_traffic = 8 * numel / base_seconds  # bytes read + written per second
    rows = [{"kernel": "dst.copy_(src)", "impl": "torch", "seconds": base_seconds, "median_seconds": base_median,
             "gbps": fp32_bytes / base_seconds / 1e9, "ratio_vs_copy": 1.0,
             "traffic_gbps": copy_traffic / 1e9, "bandwidth_vs_copy": 1.0}]
    print_row(rows[-1])
    del dst
    if device == "cpu":  # for context: clone() also pays for a fresh allocation and its page faults
        seconds, median = timed(src.clone, args.repeat, device)
        rows.append({"kernel": "clone()", "impl": "torch", "seconds": seconds, "median_seconds": median,
                     "gbps": fp32_bytes / seconds / 1e9, "ratio_vs_copy": base_seconds / seconds,
                     "traffic_gbps": 8 * numel / seconds / 1e9, "bandwidth_vs_copy": base_seconds / seconds})
        print_row(rows[-1])
    for impl_name, kernels in impls.items():
        cases = kernel_cases(kernels, numel, args.world_size, device)
        for kernel_name, (call, traffic) in cases.items():
            seconds, median = timed(call, args.repeat, device)
            rows.append({"kernel": kernel_name, "impl": impl_name, "seconds": seconds, "median_seconds": median,
                         "gbps": fp32_bytes / seconds / 1e9, "ratio_vs_copy": base_seconds / seconds,
                         "traffic_gbps": traffic * numel / seconds / 1e9,
                         "bandwidth_vs_copy": traffic * numel / seconds / copy_traffic})
            print_row(rows[-1])
        del cases
    return rows


def print_row(row: dict) -> None:
    """Print one line of the kernel table as soon as it is measured."""
    print(f"{row['kernel']:<34} {row['impl']:<14} {row['seconds'] * 1e3:>10.3f} {row['gbps']:>9.2f} "
          f"{row['ratio_vs_copy']:>8.2f} {row['traffic_gbps']:>10.1f} {100 * row['bandwidth_vs_copy']:>7.0f}%",
          flush=True)


def foreach_lion_step(params: list, grads: list, exp_avgs: list) -> None:
    """Take one Lion step (decay, sign step, momentum) with torch._foreach ops on one GPU."""
    torch._foreach_mul_(params, 1.0 - LR * WEIGHT_DECAY)
    update = torch._foreach_mul(exp_avgs, BETA1)
    torch._foreach_add_(update, grads, alpha=1.0 - BETA1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-LR)
    torch._foreach_mul_(exp_avgs, BETA2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - BETA2)


def fused_lion_step(params: list, exp_avgs: list) -> None:
    """One Lion step in one Triton kernel per tensor: reads p, g, m once, writes p, m (the floor)."""
    import triton
    block = 4096
    for p, m in zip(params, exp_avgs):
        n = p.numel()
        _fused_lion_kernel()[(triton.cdiv(n, block),)](
            p, p.grad, m, n, 1.0 - LR * WEIGHT_DECAY, -LR, BETA1, 1.0 - BETA1, BETA2, 1.0 - BETA2,
            BLOCK=block, num_warps=8)


_FUSED_LION = []


def _fused_lion_kernel():
    """Compile the baseline fused Lion kernel on first use (Triton is imported only for CUDA runs)."""
    if not _FUSED_LION:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(p_ptr, g_ptr, m_ptr, n, decay, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                   BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            p = tl.load(p_ptr + offs, mask=mask)
            g = tl.load(g_ptr + offs, mask=mask)
            m = tl.load(m_ptr + offs, mask=mask)
            c = m * beta1 + g * one_minus_beta1
            s = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
            tl.store(p_ptr + offs, p * decay + neg_lr * s, mask=mask)
            tl.store(m_ptr + offs, m * beta2 + g * one_minus_beta2, mask=mask)
        _FUSED_LION.append(kernel)
    return _FUSED_LION[0]


def bench_optimizer_step(args: argparse.Namespace, device: str = "cuda") -> list[dict]:
    """Time one optimizer step on --size fp32 parameters (transformer-like 4096-wide matrices)."""
    cuda = device == "cuda"
    width = 4096 if args.size >= 1 << 24 else 256
    shapes = [(width, width)] * (args.size // (width * width))
    if args.size % (width * width):
        shapes.append((args.size % (width * width),))
    params = [torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)

    def make_distlion():
        from distlion import DistLion
        opt = DistLion(params, lr=LR, betas=(BETA1, BETA2), weight_decay=WEIGHT_DECAY,
                       bucket_cap_mb=args.bucket_cap_mb)
        return opt.step

    def make_adamw():
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        return opt.step

    def make_foreach_lion():
        grads = [p.grad for p in params]
        exp_avgs = [torch.zeros_like(p) for p in params]
        return lambda: foreach_lion_step(params, grads, exp_avgs)

    def make_fused_lion():
        exp_avgs = [torch.zeros_like(p) for p in params]
        return lambda: fused_lion_step(params, exp_avgs)

    makers = [("DistLion (1 rank)", make_distlion), ("AdamW(fused=True)", make_adamw),
              ("foreach Lion", make_foreach_lion)]
    if cuda:
        makers.append(("fused Lion (Triton)", make_fused_lion))
    rows = []
    for name, make in makers:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                step = make()
                seconds, median = timed(step, args.repeat, device)
        except Exception as error:  # DistLion may be mid-rewrite; report and keep measuring the rest
            rows.append({"optimizer": name, "params": numel, "error": f"{type(error).__name__}: {error}"})
            print(f"{name:<22} failed: {rows[-1]['error']}", flush=True)
            continue
        finally:
            step = None  # drop the optimizer and its state before the next one
        peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        rows.append({"optimizer": name, "params": numel, "seconds": seconds, "median_seconds": median,
                     "peak_memory_gb": peak_gb})
        print(f"{name:<22} {seconds * 1e3:>10.2f} {numel / seconds / 1e9:>12.2f} {peak_gb:>10.1f}", flush=True)
    return rows


def machine() -> dict:
    """Describe the hardware without naming the host."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2)}  # other jobs skew CPU timings
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print (and optionally write) the tables."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"# {info['processor']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads "
          f"(load {info['load_average_1min']}), "
          f"torch {info['torch']}" + (f", {info['gpu']}" if "gpu" in info else ""))
    print(f"# d = {args.numel:,} coordinates, N = {args.world_size}, best of {args.repeat}; "
          f"GB/s = 4 bytes x d / time; x copy = copy time / kernel time (> 1: faster than the copy)")
    print("# traffic = bytes the kernel must read + write / time; bw = traffic / the copy's (read + write)")
    print(f"{'kernel':<34} {'impl':<14} {'ms':>10} {'GB/s':>9} {'x copy':>8} {'traffic':>10} {'bw':>8}")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "kernels": bench_kernels(args)}
    if args.device == "cuda":
        print(f"\n# one optimizer step on {args.size:,} fp32 parameters, best of {args.repeat}; "
              f"DistLion buckets of {args.bucket_cap_mb:g} MiB")
        print(f"{'optimizer':<22} {'ms':>10} {'Gparams/s':>12} {'peak GB':>10}")
        results["optimizer_step"] = bench_optimizer_step(args)
        seconds = {row["optimizer"]: row["seconds"] for row in results["optimizer_step"] if "seconds" in row}
        mine = seconds.get("DistLion (1 rank)")
        for other in ("fused Lion (Triton)", "AdamW(fused=True)", "foreach Lion"):
            if mine and other in seconds:
                print(f"DistLion / {other}: {mine / seconds[other]:.2f}x the time")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
