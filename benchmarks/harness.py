"""What the benchmarks share: model sizes, launching workers, timed steps, results files.

Each benchmark module is both the orchestrator and, with ``--worker``, the worker. The
orchestrator starts workers with ``torchrun -m`` on loopback (``launch_local``) or, for the
constrained link, with ``ip netns exec`` (``benchmarks.netlink``); workers join the
process group from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
rank 0 writes its measurements as JSON to the path given with ``--result``.

Three ways to train the same model, built side by side in one process group:

- ``distlion``: DistLion, no DDP wrapper; its phase is ``optimizer.step()`` (pack,
  exchange, vote, apply).
- ``adamw_ddp``: DDP with DDP's fp32 all-reduce (counted by a comm hook) + foreach
  AdamW, exactly as users run it: the all-reduce overlaps the backward pass. Its whole
  step is the baseline step time.
- ``adamw_ddp_phase``: the same DDP buckets and all-reduces, deferred until after the
  backward pass (``launch.comm_hooks.DeferredAllReduce``), then AdamW.
  Its phase, all-reduce + AdamW step, is the baseline's optimizer-plus-communication
  time, measured the same way as DistLion's.

And two over FSDP2 on a (replicate, shard) mesh of M nodes x G ranks (``device_mesh``,
rank = node * G + g), each transformer block and then the root sharded
(``shard_model``):

- ``fsdp_hybrid_adamw``: ``fully_shard(module, mesh=mesh)`` on the 2-D mesh (HSDP: FSDP
  reduce-scatters the gradient in the node and all-reduces its fp32 shard across the
  replicate dim, in backward) + foreach AdamW. Its counted bytes are that all-reduce's,
  ring formula over the M replicas (an all-reduce hook sees each all-reduced shard).
- ``fsdp_distlion``: ``fully_shard(module, mesh=mesh["shard"])`` + ``DistLion(...,
  device_mesh=mesh)``: the replicate dim votes on each rank's local shards in the phase.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from distlion import CommStats, DistLion
from distlion.worker_exit import exit_worker
from launch.comm_hooks import HOOKS, AllReduceCounter, DeferredAllReduce, deferring_hook
from launch.model import GPT, GPTConfig
from launch.report import command_line, machine_info, today

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
# Other work on the machine slows every timing: the results record the load before and after.
LOAD_AT_START = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
# Byte-level GPTs by parameter count; "small" is the 3.85M-parameter size of docs/design.md §5.
MODEL_SIZES = {
    "tiny": GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32),       # 0.03M, smoke runs
    "demo": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),    # 0.84M, launch.train's (the demo's)
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=280, block_size=128),    # 3.89M
    "medium": GPTConfig(n_layer=6, n_head=8, n_embd=576, block_size=128),   # 24.2M
    "large": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=128),  # 85.2M
}


# ------------------------------------------------------------------------ orchestration

def worker_env(rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """Environment of one worker process (what torchrun would set), one thread each."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "OMP_NUM_THREADS": "1"}


def launch_local(module: str, worker_args: list[str], world_size: int, timeout: float) -> dict:
    """Run ``torchrun -m MODULE --worker ARGS`` on ``world_size`` loopback processes; return rank 0's JSON.

    ``module`` is the benchmark's module name, e.g. ``"benchmarks.step_time"`` (``__spec__.name``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
                   "-m", module, "--worker", "--result", result, *worker_args]
        subprocess.run(command, check=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
        with open(result) as f:
            return json.load(f)


def free_port() -> int:
    """A TCP port free on this machine now (for a server started next)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextmanager
def torchft_lighthouse(min_replicas: int = 2, join_timeout_ms: int = 2000,
                       heartbeat_timeout_ms: int = 5000) -> Iterator[str]:
    """torchft's Lighthouse, the server people run (``torchft_lighthouse``), on a free port; yield its address.

    A generous heartbeat timeout: a replica group whose heartbeats come late on a loaded
    machine would be dropped from the quorum.
    """
    port = free_port()
    beside = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")  # this virtualenv's, unactivated
    binary = beside if os.path.exists(beside) else "torchft_lighthouse"
    server = subprocess.Popen([binary, "--bind", f"[::]:{port}", "--min_replicas", str(min_replicas),
                               "--join_timeout_ms", str(join_timeout_ms), "--quorum_tick_ms", "50",
                               "--heartbeat_timeout_ms", str(heartbeat_timeout_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RUST_LOG": "warn"})
    try:
        yield f"http://localhost:{port}"
    finally:
        server.kill()
        server.wait()


def write_results(name: str, payload: dict, out_dir: str | None, smoke: bool) -> str:
    """Write ``payload`` with date and machine to ``out_dir/NAME-DATE.json`` (smoke: NAME-smoke.json)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-smoke.json" if smoke else f"{name}-{today()}.json")
    record = {"benchmark": name, "date": today(), "smoke": smoke,
              "machine": {**machine_info(), "load_average_1m_at_start": LOAD_AT_START},
              "command": command_line(), **payload}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"results: {path}")
    return path


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that it runs")
    parser.add_argument("--out", default=None, metavar="DIR", help="results directory (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


def add_loopback_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model size, ranks and batch shape shared by the loopback timing benchmarks."""
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--world_size", type=positive_int, default=4)
    parser.add_argument("--batch_size", type=positive_int, default=2, help="sequences per rank")
    parser.add_argument("--seq_len", type=positive_int, default=64)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# ------------------------------------------------------------------------------ workers

def join_group() -> tuple[int, int]:
    """Join the gloo process group from the environment; return (rank, world_size)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish_worker(result_path: str, payload: dict) -> None:
    """Rank 0 writes ``payload``; then every rank waits for the others and ends its process."""
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(payload, f)
    dist.barrier()
    exit_worker()


def make_batch(config: GPTConfig, batch_size: int, seq_len: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes: the benchmarks time steps, not learning; each rank gets its own batch."""
    generator = torch.Generator().manual_seed(1000 + rank)
    tokens = torch.randint(0, 256, (batch_size, min(seq_len, config.block_size) + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


@dataclass
class Trainer:
    """One way to train: forward+backward, then the optimizer-plus-communication phase."""

    name: str
    forward_backward: Callable[[torch.Tensor, torch.Tensor], None]
    phase: Callable[[], None]
    bytes_sent: Callable[[], int]  # cumulative, this rank, counted per collective
    comm_stats: CommStats | None = None  # DistLion's counters by link class (None for DDP)


def _model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)  # the same initial weights on every rank
    return GPT(config)


def distlion_trainer(config: GPTConfig, *, vote: str = "majority", exchange: str = "auto",
                     vote_ema_beta: float | None = None, ranks_per_node: int | str = "auto", k: str = "sign",
                     momentum_sync_every: int | None = None, name: str = "distlion") -> Trainer:
    model = _model(config)
    optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1, vote=vote, exchange=exchange,
                         vote_ema_beta=vote_ema_beta, ranks_per_node=ranks_per_node, k=k,
                         momentum_sync_every=momentum_sync_every)
    return _distlion_steps(name, model, optimizer)


def _distlion_steps(name: str, model: GPT, optimizer: DistLion) -> Trainer:
    """The trainer of ``model`` with DistLion: backward, then the phase ``step()``; bytes from its counters."""
    def forward_backward(x, y):
        model(x, y)[1].backward()

    def phase():
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return Trainer(name, forward_backward, phase, lambda: optimizer.comm_stats.bytes_sent, optimizer.comm_stats)


def adamw_ddp_trainer(config: GPTConfig, *, wire_dtype: str = "fp32", deferred: bool = False,
                      name: str = "adamw_ddp") -> Trainer:
    """DDP + foreach AdamW; ``deferred`` moves the all-reduce out of backward into the phase."""
    model = _model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    counter = AllReduceCounter.for_group(None)
    if not deferred:
        ddp = DDP(model)
        ddp.register_comm_hook(counter, HOOKS[wire_dtype])

        def phase():
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    else:
        if wire_dtype != "fp32":
            raise ValueError(f"deferred all-reduce is fp32 only, got wire_dtype={wire_dtype!r}")
        ddp = DDP(model, gradient_as_bucket_view=True)
        deferred_allreduce = DeferredAllReduce(counter)
        ddp.register_comm_hook(deferred_allreduce, deferring_hook)

        def phase():
            deferred_allreduce.run()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

    def forward_backward(x, y):
        ddp(x, y)[1].backward()

    return Trainer(name, forward_backward, phase, lambda: counter.bytes_sent)


def device_mesh(ranks_per_node: int):
    """The (replicate, shard) mesh of this process group: M = N / G nodes of G ranks, rank = node * G + g."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size = dist.get_world_size()
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the world size {world_size}")
    return init_device_mesh("cpu", (world_size // ranks_per_node, ranks_per_node),
                            mesh_dim_names=("replicate", "shard"))


def shard_model(model: GPT, mesh, **fsdp_options) -> GPT:
    """``fully_shard`` each transformer block, then the root, over ``mesh``: the 2-D mesh for FSDP's hybrid
    sharding (HSDP), ``mesh["shard"]`` for sharding inside the node only (DistLion votes across nodes)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, **fsdp_options)
    return fully_shard(model, mesh=mesh, **fsdp_options)


def count_hsdp_all_reduce(model: GPT, counter: AllReduceCounter) -> None:
    """Count FSDP's HSDP all-reduces across the replicate dim in ``counter`` (ring formula, per rank): each
    FSDP module's hook sees the shard it all-reduced."""
    from torch.distributed.fsdp import FSDPModule

    def hook(reduce_output: torch.Tensor) -> None:
        counter.count(reduce_output.numel(), reduce_output.element_size())

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(hook)


def fsdp_adamw_trainer(config: GPTConfig, mesh, name: str = "fsdp_hybrid_adamw") -> Trainer:
    """FSDP2's hybrid sharding over the 2-D mesh (fp32 reduce-scatter in the node, fp32 all-reduce of the
    shards across nodes, both in backward) + foreach AdamW on the local shards."""
    model = shard_model(_model(config), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    counter = AllReduceCounter.for_group(mesh.get_group("replicate"))
    count_hsdp_all_reduce(model, counter)

    def forward_backward(x, y):
        model(x, y)[1].backward()

    def phase():
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return Trainer(name, forward_backward, phase, lambda: counter.bytes_sent)


def fsdp_distlion_trainer(config: GPTConfig, mesh, *, vote_ema_beta: float | None = None,
                          name: str = "fsdp_distlion") -> Trainer:
    """FSDP2 inside the node (``mesh["shard"]``) + DistLion voting across the replicate dim."""
    model = shard_model(_model(config), mesh["shard"])
    optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1, vote_ema_beta=vote_ema_beta,
                         device_mesh=mesh)
    return _distlion_steps(name, model, optimizer)


def timed_steps(trainer: Trainer, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> dict:
    """Run ``steps`` steps; return per-step times (s) and bytes sent during them.

    Every rank starts each step together (a barrier, outside the timed region), so a
    step's time is not another rank's lag from the previous step.
    """
    totals, phases = [], []
    sent_before = trainer.bytes_sent()
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        trainer.forward_backward(*batch)
        t1 = time.perf_counter()
        trainer.phase()
        t2 = time.perf_counter()
        totals.append(t2 - t0)
        phases.append(t2 - t1)
    return {"step_s": totals, "phase_s": phases, "bytes_sent": trainer.bytes_sent() - sent_before}


def summarize(samples: list[dict]) -> dict:
    """Median step and phase times (robust to a busy machine) and bytes per step."""
    step_s = [t for s in samples for t in s["step_s"]]
    phase_s = [t for s in samples for t in s["phase_s"]]
    return {"step_s": statistics.median(step_s), "phase_s": statistics.median(phase_s),
            "compute_s": statistics.median(a - b for a, b in zip(step_s, phase_s)),
            "step_s_min": min(step_s), "phase_s_min": min(phase_s), "samples": len(step_s),
            "bytes_sent_per_step": sum(s["bytes_sent"] for s in samples) / max(len(step_s), 1)}


def interleaved(trainers: list[Trainer], batch, *, warmup: int, steps: int, rounds: int,
                before: Callable[[str], None] | None = None, after: Callable[[str], dict] | None = None) -> dict:
    """Time each trainer for ``rounds`` rounds of ``steps`` steps, interleaved, after ``warmup`` steps.

    Interleaving spreads any slow period of the machine over all trainers. ``before`` and
    ``after`` run around each timed block (e.g. to read network counters); ``after``'s
    dict values are summed per trainer.
    """
    for trainer in trainers:
        timed_steps(trainer, batch, warmup)
    samples = {t.name: [] for t in trainers}
    extra: dict[str, dict] = {t.name: {} for t in trainers}
    for _ in range(rounds):
        for trainer in trainers:
            if before is not None:
                before(trainer.name)
            samples[trainer.name].append(timed_steps(trainer, batch, steps))
            if after is not None:
                for key, value in after(trainer.name).items():
                    extra[trainer.name][key] = extra[trainer.name].get(key, 0) + value
    return {name: {**summarize(s), **extra[name]} for name, s in samples.items()}
