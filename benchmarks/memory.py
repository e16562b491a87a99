"""Optimizer memory per rank: DistLion (flat, node-level, over FSDP2) against AdamW + DDP, ZeRO-1 and FSDP2.

N gloo ranks on loopback (CPU) train a GPT for a few steps; every rank reports:

- optimizer bytes: the nbytes of every tensor storage reachable from the optimizer
  object (its attributes, lists, dicts and dataclasses, each storage counted once),
  except the model's parameters, listed by kind. For DistLion that is the momentum,
  fp32 master weights (bf16 parameters), vote EMA (``vote_ema_beta``), and the scratch it
  allocates once: the chunk gradient buffer (the momentum's swap partner), the two
  staging buffers of the largest bucket that carry the intra-node reduce-scatter
  (``ranks_per_node`` > 1, in ``reduce_dtype``, fp32 by default), the packed signs and the exchange's send and
  receive buffers. For AdamW: exp_avg, exp_avg_sq and step; with bf16 parameters also the
  fp32 master weights and their fp32 gradients. For ZeRO-1 (torch's
  ``ZeroRedundancyOptimizer``): the same for this rank's shard of the parameters.
  *State* is what a checkpoint must keep (momentum, exp_avg, exp_avg_sq, step, master,
  vote EMA); *scratch* is the rest.
- peak RSS (VmHWM) after a few steps, and its increase over the model-only baseline
  (the same model after forward and backward passes, gradients held, no optimizer):
  that increase also holds what the byte count cannot see, such as DDP's gradient
  buckets and the kernels' workspaces.

Also held per rank: the parameters and the gradients this rank holds (each storage
once; a DTensor's local shard, so FSDP2's are ~1/G of the model's), and *held* =
parameters + gradients + optimizer bytes.

FSDP2 setups (N ranks as a (replicate, shard) mesh of N/G nodes of G, rank = node * G + g;
each transformer block and the root sharded, see ``benchmarks.harness``):
``fsdp2_adamw_gG`` is FSDP2's hybrid sharding over the 2-D mesh (the baseline: fp32
reduce-scatter in the node, fp32 all-reduce across nodes) + AdamW on the local shards;
``fsdp2_distlion_gG`` shards over ``mesh["shard"]`` and DistLion(..., device_mesh=mesh)
votes across nodes. Their model is sharded before the peak is reset (a real job builds
it on the meta device, not whole on every rank), so their baseline is the sharded model
after forward and backward passes. With bf16 their parameters stay fp32 shards (the master
weights) under ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: FSDP2's
mixed precision, forward and backward in bf16.

bf16 runs of the other setups cast the model to bf16; DistLion keeps fp32 master weights
(``master_weights=True``), and AdamW gets fp32 masters and fp32 gradient copies (mixed
precision as DeepSpeed runs it). torch's ZeRO-1 shards AdamW's moments only: the masters
it steps are replicated on every rank (DeepSpeed's ZeRO-1 also shards them).

The recorded run starts fresh processes for each optimizer (fp32, then bf16, with the
peak RSS reset between them); ``--smoke`` measures every configuration in one launch. glibc's mmap
threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so freed buffers go back to the system::

    python -m benchmarks.memory                  # 24.2M params, 4 ranks (5-10 min)
    python -m benchmarks.memory --smoke          # tiny model, 2 ranks, seconds
    python -m benchmarks.memory --size large --setups distlion_g2 fsdp2_adamw_g2 fsdp2_distlion_g2 --tag fsdp-large
    python -m benchmarks.memory --smoke --world_size 4 --setups distlion_g2 fsdp2_adamw_g2 fsdp2_distlion_g2
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import harness
from distlion import DistLion
from distlion.local_shards import is_dtensor
from launch.model import GPT, GPTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATE_KINDS = ("momentum", "exp_avg", "exp_avg_sq", "step", "master", "vote_ema")
MMAP_THRESHOLD = 1 << 16  # bytes; fixed, so glibc returns freed buffers instead of raising the threshold
# Objects whose attributes the byte count walks; anything else (process groups, modules) is opaque.
_WALKED_MODULES = ("distlion", "torch.optim", "torch.distributed.optim", "benchmarks")


@dataclass(frozen=True)
class Setup:
    """One optimizer configuration: DistLion with ``ranks_per_node`` or an AdamW baseline; FSDP2 setups shard
    over nodes of ``ranks_per_node`` ranks."""

    name: str
    optimizer: str  # "distlion", "adamw_ddp", "adamw_zero1_ddp", "fsdp_hybrid_adamw" or "fsdp_distlion"
    ranks_per_node: int = 1
    vote_ema_beta: float | None = None

    @property
    def fsdp(self) -> bool:
        return self.optimizer.startswith("fsdp")


def setups(world_size: int) -> list[Setup]:
    """DistLion at every G dividing N from {1, 2, 4}, with and without the vote EMA; then the baselines; then
    FSDP2 + AdamW (hybrid) and FSDP2 + DistLion at every G from {2, 4} that leaves at least 2 nodes."""
    found = []
    for g in (1, 2, 4):
        if world_size % g == 0:
            found += [Setup(f"distlion_g{g}", "distlion", g), Setup(f"distlion_g{g}_ema", "distlion", g, 0.9)]
    found += [Setup("adamw_ddp", "adamw_ddp"), Setup("adamw_zero1_ddp", "adamw_zero1_ddp")]
    for g in (2, 4):
        if world_size % g == 0 and world_size // g >= 2:
            found += [Setup(f"fsdp2_adamw_g{g}", "fsdp_hybrid_adamw", g),
                      Setup(f"fsdp2_distlion_g{g}", "fsdp_distlion", g)]
    return found


# ------------------------------------------------------------------------ byte counting

def held_bytes(root: Any, excluded: set[int]) -> dict[str, int]:
    """Sum the storage bytes of every tensor reachable from ``root``, by kind (the attribute or key name).

    Each storage counts once, under the first name it is reached by; storages whose
    data_ptr is in ``excluded`` (the model's parameters) are skipped. An attribute named
    ``state`` is walked last, so buffers are named by their owner rather than by the
    per-parameter views into them.
    """
    kinds: dict[str, int] = {}
    seen_storages, seen_objects = set(excluded), set()

    def visit(obj: Any, kind: str) -> None:
        if isinstance(obj, torch.Tensor):
            if is_dtensor(obj):  # FSDP2's parameters and AdamW's moments of them: this rank's shard
                obj = obj.to_local()
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storages and storage.nbytes() > 0:
                seen_storages.add(storage.data_ptr())
                kinds[kind] = kinds.get(kind, 0) + storage.nbytes()
            return
        if id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                visit(value, key.lstrip("_") if isinstance(key, str) else kind)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                visit(value, kind)
        elif dataclasses.is_dataclass(obj) or (type(obj).__module__.startswith(_WALKED_MODULES)
                                               and hasattr(obj, "__dict__")):
            fields = sorted(vars(obj).items(), key=lambda item: item[0] == "state")
            for name, value in fields:
                visit(value, name.lstrip("_"))

    visit(root, "optimizer")
    return kinds


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def tensor_bytes(tensors) -> tuple[int, set[int]]:
    """The bytes of the storages of ``tensors`` (DTensors: their local shards), each counted once; and their
    data pointers."""
    storages = {}
    for tensor in tensors:
        storage = _local(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    storages.pop(0, None)
    return sum(storages.values()), set(storages)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ------------------------------------------------------------------------ baselines' masters

@dataclass
class MasterAdamW:
    """AdamW (or ZeRO-1 AdamW) over fp32 copies of bf16 parameters: fp32 gradients in, bf16 parameters out."""

    params: list[torch.Tensor]
    master: list[torch.Tensor]
    master_grad: list[torch.Tensor]
    optimizer: Any

    def step(self) -> None:
        for param, grad in zip(self.params, self.master_grad):
            grad.copy_(param.grad)
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.master):
                param.copy_(master)


def build_model(setup: Setup, config: GPTConfig, dtype: torch.dtype, mesh) -> torch.nn.Module:
    """The GPT, cast to ``dtype``; FSDP2 setups: fp32, sharded over ``mesh`` (hybrid) or its shard dim, with
    bf16 compute under FSDP2's mixed precision when ``dtype`` is bf16."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(config)
    if not setup.fsdp:
        return model.to(dtype)
    options = {}
    if dtype != torch.float32:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return harness.shard_model(model, mesh if setup.optimizer == "fsdp_hybrid_adamw" else mesh["shard"], **options)


def build_optimizer(setup: Setup, model: torch.nn.Module,
                    mesh=None) -> tuple[Any, Callable[[], None], torch.nn.Module]:
    """Return (the object whose bytes are counted, its step, the module to run forward through)."""
    if setup.optimizer == "fsdp_hybrid_adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
        return optimizer, optimizer.step, model
    if setup.optimizer == "fsdp_distlion":
        optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1, vote_ema_beta=setup.vote_ema_beta,
                             device_mesh=mesh)
        return optimizer, optimizer.step, model
    if setup.optimizer == "distlion":
        optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1, ranks_per_node=setup.ranks_per_node,
                             vote_ema_beta=setup.vote_ema_beta)
        return optimizer, optimizer.step, model
    ddp = DDP(model)
    params = [p for p in model.parameters() if p.requires_grad]
    low_precision = params[0].dtype != torch.float32
    targets = [p.detach().float().requires_grad_() for p in params] if low_precision else params
    if setup.optimizer == "adamw_zero1_ddp":
        inner = ZeroRedundancyOptimizer(targets, optimizer_class=torch.optim.AdamW, lr=1e-4, weight_decay=0.01,
                                        foreach=True)
    else:
        inner = torch.optim.AdamW(targets, lr=1e-4, weight_decay=0.01, foreach=True)
    if not low_precision:
        return inner, inner.step, ddp
    for master in targets:
        master.grad = torch.zeros_like(master)
    wrapped = MasterAdamW(params, targets, [m.grad for m in targets], inner)
    return wrapped, wrapped.step, ddp


# ------------------------------------------------------------------------------ workers

def measure(setup: Setup, config: GPTConfig, dtype: torch.dtype, batch, steps: int, mesh=None) -> dict:
    """Peak RSS before and after the optimizer, its bytes by kind, and the parameters' and gradients' bytes,
    for this rank."""
    gc.collect()
    dist.barrier()
    _reset_peak_rss()
    model = build_model(setup, config, dtype, mesh)
    if setup.fsdp:  # the whole model each rank built before sharding it is gone: not part of the peak
        gc.collect()
        _reset_peak_rss()
    for _ in range(steps):
        model(*batch)[1].backward()
    baseline = _peak_rss_bytes()
    optimizer, step, forward = build_optimizer(setup, model, mesh)
    for _ in range(steps):
        forward(*batch)[1].backward()
        step()
        model.zero_grad(set_to_none=False)
    peak = _peak_rss_bytes()
    params_bytes, parameters = tensor_bytes(model.parameters())
    grads_bytes, grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    kinds = held_bytes(optimizer, parameters | grads)
    del optimizer, step, forward, model
    gc.collect()
    return {"baseline_rss": baseline, "peak_rss": peak, "bytes_by_kind": kinds, "params_bytes": params_bytes,
            "grads_bytes": grads_bytes}


def worker(args: argparse.Namespace) -> None:
    # torch.optim.Optimizer imports torch._dynamo when the first optimizer is built (~150 MiB of
    # RSS, whatever the optimizer): import it first, so the baseline holds it. Before the process
    # group exists (docs/design.md §4).
    import torch._dynamo  # noqa: F401
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    batch = harness.make_batch(config, args.batch_size, args.seq_len, rank)
    by_name = {s.name: s for s in setups(world_size)}
    # One mesh per node size, built by every rank in the same order before anything is measured.
    meshes = {g: harness.device_mesh(g) for g in sorted({by_name[n].ranks_per_node for n in args.setups
                                                          if by_name[n].fsdp})}
    results = []
    for name in args.setups:
        setup = by_name[name]
        for dtype_name in args.dtypes:
            mine = measure(setup, config, DTYPES[dtype_name], batch, args.steps, meshes.get(setup.ranks_per_node))
            every_rank = [None] * world_size
            dist.all_gather_object(every_rank, mine)
            results.append({"setup": name, "dtype": dtype_name, "ranks": every_rank})
    harness.finish_worker(args.result, {"results": results})


# ------------------------------------------------------------------------ orchestration

def summarize(setup: Setup, dtype: str, ranks: list[dict], num_parameters: int) -> dict:
    """Per-rank bytes per parameter (the largest rank's, and the mean) and RSS, from every rank's report."""
    def per_param(value: float) -> float:
        return value / num_parameters

    state = [sum(v for k, v in r["bytes_by_kind"].items() if k in STATE_KINDS) for r in ranks]
    total = [sum(r["bytes_by_kind"].values()) for r in ranks]
    held = [t + r["params_bytes"] + r["grads_bytes"] for t, r in zip(total, ranks)]
    increase = [r["peak_rss"] - r["baseline_rss"] for r in ranks]
    kinds = sorted({k for r in ranks for k in r["bytes_by_kind"]})
    return {"setup": setup.name, "optimizer": setup.optimizer, "dtype": dtype, "ranks_per_node": setup.ranks_per_node,
            "vote_ema_beta": setup.vote_ema_beta,
            "state_bytes_per_param": per_param(max(state)),
            "state_bytes_per_param_mean": per_param(sum(state) / len(state)),
            "scratch_bytes_per_param": per_param(max(t - s for t, s in zip(total, state))),
            "optimizer_bytes_per_param": per_param(max(total)),
            "optimizer_bytes_per_param_mean": per_param(sum(total) / len(total)),
            "bytes_per_param_by_kind": {k: per_param(max(r["bytes_by_kind"].get(k, 0) for r in ranks)) for k in kinds},
            "params_bytes_per_param": per_param(max(r["params_bytes"] for r in ranks)),
            "grads_bytes_per_param": per_param(max(r["grads_bytes"] for r in ranks)),
            "held_bytes_per_param": per_param(max(held)), "held_mib": max(held) / 2**20,
            "peak_rss_mib": max(r["peak_rss"] for r in ranks) / 2**20,
            "baseline_rss_mib": max(r["baseline_rss"] for r in ranks) / 2**20,
            "rss_increase_mib": max(increase) / 2**20, "rss_increase_bytes_per_param": per_param(max(increase)),
            "per_rank": ranks}


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'setup':18s} {'dtype':5s} {'state':>6} {'scratch':>8} {'total':>6} {'params':>7} {'grads':>6} "
          f"{'held':>6} {'held':>7} {'peak RSS':>9} {'RSS +':>7} {'RSS +':>6}")
    print(f"{'':18s} {'':5s} {'B/par':>6} {'B/par':>8} {'B/par':>6} {'B/par':>7} {'B/par':>6} {'B/par':>6} {'MiB':>7} "
          f"{'MiB':>9} {'MiB':>7} {'B/par':>6}")
    for r in rows:
        print(f"{r['setup']:18s} {r['dtype']:5s} {r['state_bytes_per_param']:6.2f} {r['scratch_bytes_per_param']:8.2f} "
              f"{r['optimizer_bytes_per_param']:6.2f} {r['params_bytes_per_param']:7.2f} "
              f"{r['grads_bytes_per_param']:6.2f} {r['held_bytes_per_param']:6.2f} {r['held_mib']:7.1f} "
              f"{r['peak_rss_mib']:9.1f} {r['rss_increase_mib']:7.1f} {r['rss_increase_bytes_per_param']:6.2f}")
    print("\nbytes per parameter by kind (largest rank):")
    for r in rows:
        kinds = ", ".join(f"{k} {v:.3g}" for k, v in r["bytes_per_param_by_kind"].items() if v > 0)
        print(f"  {r['setup']:18s} {r['dtype']:5s} {kinds}")


def target_check(rows: list[dict]) -> dict:
    """DistLion's optimizer bytes per rank against AdamW + ZeRO-1's, per dtype (the issue's target: <=)."""
    checks = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        picked = {r["setup"]: r for r in rows if r["dtype"] == dtype}
        zero = picked.get("adamw_zero1_ddp")
        if zero is None:
            continue
        checks[dtype] = {name: {"optimizer_bytes_per_param": r["optimizer_bytes_per_param"],
                                "state_bytes_per_param": r["state_bytes_per_param"],
                                "total_at_most_zero1": r["optimizer_bytes_per_param"]
                                <= zero["optimizer_bytes_per_param"],
                                "state_at_most_zero1": r["state_bytes_per_param"] <= zero["state_bytes_per_param"]}
                         for name, r in picked.items() if r["optimizer"] == "distlion"}
    return checks


def target_check_fsdp(rows: list[dict]) -> dict:
    """DistLion's memory per rank against FSDP2 + AdamW's at the same G, per dtype (the target: <=): held bytes
    (parameters + gradients + optimizer) and peak RSS, for FSDP2 + DistLion and for replicated DistLion."""
    checks = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        picked = {r["setup"]: r for r in rows if r["dtype"] == dtype}
        for base in (r for r in picked.values() if r["optimizer"] == "fsdp_hybrid_adamw"):
            g = base["ranks_per_node"]
            for name, r in picked.items():
                if r["optimizer"] in ("distlion", "fsdp_distlion") and r["ranks_per_node"] == g:
                    checks.setdefault(dtype, {})[name] = {
                        "baseline": base["setup"],
                        "held_bytes_per_param": r["held_bytes_per_param"],
                        "baseline_held_bytes_per_param": base["held_bytes_per_param"],
                        "peak_rss_mib": r["peak_rss_mib"], "baseline_peak_rss_mib": base["peak_rss_mib"],
                        "held_at_most_fsdp2_adamw": r["held_bytes_per_param"] <= base["held_bytes_per_param"],
                        "peak_rss_at_most_fsdp2_adamw": r["peak_rss_mib"] <= base["peak_rss_mib"]}
    return checks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_loopback_workload_arguments(parser)
    parser.add_argument("--steps", type=harness.positive_int, default=3, help="steps before the peak is read")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--setups", nargs="+", default=None, help="configurations (default: all that fit N)")
    parser.add_argument("--tag", default=None, help="results file memory-TAG-DATE.json (default memory-DATE.json)")
    harness.add_common_arguments(parser)
    parser.set_defaults(size="medium", world_size=None)  # default N: 4, smoke 2
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.size, args.steps = "tiny", 1
    args.world_size = args.world_size or (2 if args.smoke else 4)
    known = {s.name: s for s in setups(args.world_size)}
    chosen = args.setups or list(known)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        parser.error(f"--setups {unknown}: with --world_size {args.world_size} use some of {list(known)}")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # inherited by the workers
    worker_args = ["--size", args.size, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                   "--steps", str(args.steps), "--dtypes", *args.dtypes]
    # Smoke: one launch for everything; recorded run: fresh processes for each configuration.
    launches = [chosen] if args.smoke else [[name] for name in chosen]
    measured = []
    for names in launches:
        measured += harness.launch_local(__spec__.name, [*worker_args, "--setups", *names], args.world_size,
                                         timeout=900)["results"]
    config = harness.MODEL_SIZES[args.size]
    num_parameters = config.num_parameters
    rows = [summarize(known[m["setup"]], m["dtype"], m["ranks"], num_parameters) for m in measured]
    rows.sort(key=lambda r: (args.dtypes.index(r["dtype"]), chosen.index(r["setup"])))
    print_table(rows, f"{args.world_size} gloo ranks, GPT of {num_parameters:,} parameters; bytes per parameter "
                      f"per rank (largest rank), peak RSS and its increase over the model alone")
    checks = target_check(rows)
    for dtype, check in checks.items():
        met = [name for name, c in check.items() if c["total_at_most_zero1"]]
        print(f"{dtype}: optimizer bytes <= AdamW + ZeRO-1's: {', '.join(met) or 'none'}")
    checks_fsdp = target_check_fsdp(rows)
    for dtype, check in checks_fsdp.items():
        for name, c in check.items():
            held_met = "met" if c["held_at_most_fsdp2_adamw"] else "missed"
            rss_met = "met" if c["peak_rss_at_most_fsdp2_adamw"] else "missed"
            print(f"{dtype}: {name} against {c['baseline']}: held {c['held_bytes_per_param']:.2f} vs "
                  f"{c['baseline_held_bytes_per_param']:.2f} B/param ({held_met}), peak RSS "
                  f"{c['peak_rss_mib']:.1f} vs {c['baseline_peak_rss_mib']:.1f} MiB ({rss_met}); "
                  f"target <= FSDP2 + AdamW's")
    payload = {"world_size": args.world_size, "size": args.size, "num_parameters": num_parameters,
               "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "fresh_process_per_setup": not args.smoke, "malloc_mmap_threshold": MMAP_THRESHOLD,
               "state_kinds": list(STATE_KINDS), "rows": rows, "target_vs_zero1": checks,
               "target_vs_fsdp2_adamw": checks_fsdp}
    harness.write_results("memory" if args.tag is None else f"memory-{args.tag}", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
