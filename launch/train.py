"""Train a byte-level GPT with DistLion, AdamW + DDP, or global Lion, and record what it cost.

This is the script behind the demo and the convergence benchmark. It writes
``metrics.json`` to ``--out``: the validation loss curve, the bytes this rank sent
for gradients or signs (measured: DistLion's ``comm_stats``, DDP's all-reduce through a
counting comm hook), time per step, and a digest of every rank's parameters. For
DistLion and Lion each validation point also records ``constraint``: the optimizer's
``constraint_stats()`` (||weight_decay * x||_inf per param group, the share of
coordinates outside that box, and the phase: "decaying" into the box or "inside" it).

Run it from the repository root, as a module. Single process (DistLion with one rank
is plain Lion)::

    python -m launch.train --optimizer distlion --steps 200

Four local workers on CPU (gloo), the standard way::

    torchrun --standalone --nproc_per_node 4 -m launch.train --optimizer distlion
    torchrun --standalone --nproc_per_node 4 -m launch.train --optimizer adamw

Two nodes: ``torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m launch.train ...``.

Accelerate (DistLion goes through ``distlion.accelerate.prepare``)::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 4 -m launch.train --accelerate

FSDP2 on a (replicate, shard) mesh of M nodes of G ranks (``--ranks_per_node G``, default
LOCAL_WORLD_SIZE): each block is ``fully_shard``-ed over a node's ranks. DistLion votes
across the replicas; ``adamw`` is FSDP2's hybrid sharding (its replicate all-reduce)::

    torchrun --standalone --nproc_per_node 4 -m launch.train --fsdp --ranks_per_node 2

DeepSpeed (DistLion goes through ``distlion.deepspeed.initialize``)::

    deepspeed --module launch.train --deepspeed_config launch/deepspeed/CONFIG.json

Optimizers: ``distlion`` votes the ranks' 1-bit Lion updates and needs no DDP wrapper
(gradients stay local); ``adamw`` is DDP (fp32 gradient all-reduce) + foreach AdamW;
``lion`` is global Lion: DDP averages the gradients, then every rank takes the same
Lion step (DistLion in a process group of its own, i.e. plain Lion).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from distlion import DistLion, unwrap
from distlion.options import add_flags, from_flags
from distlion.worker_exit import exit_worker
from launch.comm_hooks import AllReduceCounter, counting_allreduce_hook
from launch.data import TrainWindows, check_fits, load_corpus, train_batch
from launch.model import GPT, GPTConfig
from launch.recipe import DEFAULT_HYPERPARAMETERS, Session, evaluate, lr_at

OPTIMIZERS = ("distlion", "adamw", "lion")


# ---------------------------------------------------------------------------- arguments

def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _beta_or_off(text: str) -> float | str:
    if text == "off":
        return text
    value = float(text)
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1) (or 'off')")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default="distlion")
    opt.add_argument("--lr", type=_non_negative_float, default=None,
                     help="peak learning rate (default: 3e-3 for adamw, 6e-3 for distlion and lion)")
    opt.add_argument("--weight_decay", type=_non_negative_float, default=None,
                     help="decoupled weight decay of matrices and embeddings (default: 0.1 for adamw, 0.3 for "
                          "distlion and lion)")
    opt.add_argument("--embedding_lr_scale", type=_positive_float, default=None,
                     help="the token and position embeddings (the token one is also the output layer) take this "
                          "multiple of the lr (default: 1 for adamw, 10 for distlion and lion)")
    opt.add_argument("--betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                     help="default: 0.9 0.95 for adamw, 0.9 0.999 for distlion and lion")
    opt.add_argument("--vote_ema_beta", type=_beta_or_off, default=None, metavar="BETA",
                     help="distlion and lion: scale each coordinate's step by the squared EMA of its votes with "
                          "this beta ('off': Lion's unscaled step, whose lr should be 3-10x smaller; default 0.9)")
    add_flags(opt)  # every other DistLion option (distlion.options): --vote, --k, --ranks_per_node, ...
    opt.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up (default: 10%% of --steps)")
    opt.add_argument("--min_lr_ratio", type=_non_negative_float, default=0.1,
                     help="cosine decay ends at this fraction of the peak lr")
    model = parser.add_argument_group("model")
    model.add_argument("--n_layer", type=_positive_int, default=4)
    model.add_argument("--n_head", type=_positive_int, default=4)
    model.add_argument("--n_embd", type=_positive_int, default=128)
    model.add_argument("--block_size", type=_positive_int, default=128, help="context length in bytes")
    run = parser.add_argument_group("run")
    run.add_argument("--data", default=None, metavar="FILE",
                     help="text file to train on (default: the Python standard library's source)")
    run.add_argument("--steps", type=_positive_int, default=300)
    run.add_argument("--batch_size", type=_positive_int, default=8, help="sequences per worker per step")
    run.add_argument("--eval_interval", type=_positive_int, default=25, help="steps between validation passes")
    run.add_argument("--eval_sequences", type=_positive_int, default=256,
                     help="validation windows, shared out among the workers")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, metavar="DIR", help="where metrics.json goes (default: runs/OPTIMIZER)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: cuda:LOCAL_RANK with NCCL when a GPU is present, else cpu with gloo")
    run.add_argument("--no_progress", action="store_true", help="no progress bar (logs a line per eval)")
    wrap = parser.add_mutually_exclusive_group()
    wrap.add_argument("--accelerate", action="store_true",
                      help="run under `accelerate launch`: DistLion goes through distlion.accelerate.prepare")
    wrap.add_argument("--fsdp", action="store_true",
                      help="torchrun: FSDP2 inside each node of --ranks_per_node ranks; distlion votes across "
                           "nodes, adamw is FSDP2's hybrid sharding")
    wrap.add_argument("--deepspeed_config", default=None, metavar="PATH",
                      help="run under the DeepSpeed launcher with this config: DistLion goes through "
                           "distlion.deepspeed.initialize")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and complete the arguments; errors name the bad value (argparse exits with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.optimizer == "adamw" and args.vote_ema_beta is not None:
        parser.error(f"--vote_ema_beta {args.vote_ema_beta}: only distlion and lion take it")
    if args.optimizer == "adamw" and args.k != "sign":
        parser.error(f"--k {args.k}: only distlion and lion take it")
    if args.optimizer != "distlion" and args.ranks_per_node not in ("auto", 1) and not args.fsdp:
        parser.error(f"--ranks_per_node {args.ranks_per_node}: only distlion takes it")
    defaults = DEFAULT_HYPERPARAMETERS[args.optimizer]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.betas = tuple(args.betas)
    if not all(0.0 <= beta < 1.0 for beta in args.betas):
        parser.error(f"--betas {args.betas[0]} {args.betas[1]}: each must be in [0, 1)")
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 10
    if not 0 <= args.warmup_steps <= args.steps:
        parser.error(f"--warmup_steps {args.warmup_steps}: use a value in [0, --steps={args.steps}]")
    if args.min_lr_ratio > 1.0:
        parser.error(f"--min_lr_ratio {args.min_lr_ratio}: use a value in [0, 1]")
    if args.deepspeed_config is not None and not os.path.isfile(args.deepspeed_config):
        parser.error(f"--deepspeed_config {args.deepspeed_config!r}: no such file")
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data!r}: no such file")
    try:
        args.model = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size)
    except ValueError as error:
        parser.error(str(error))
    args.out = args.out or os.path.join("runs", args.optimizer)
    return args


# ------------------------------------------------------------------------------ session

def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_session(args: argparse.Namespace) -> Session:
    """Join the process group the launcher set up (torchrun, accelerate, deepspeed), if any."""
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()
        return Session(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator)
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    device = _pick_device(args.device, local_rank)
    if args.deepspeed_config is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return Session(dist.get_rank(), dist.get_world_size(), device)
    return Session(device=device)


# ------------------------------------------------------------------------------ engines

@dataclass
class Engine:
    """One training setup behind a common face: forward, backward, step, and what it sent."""

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> loss
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]     # optimizer step, then gradients cleared
    optimizer: Any               # its param_groups get the scheduled lr before every step
    module: torch.nn.Module      # the bare model, for evaluation and digests
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    bytes_sent: Callable[[], int | None]  # cumulative bytes this rank sent for the update; None: not measured


def _step_and_clear(optimizer: Any) -> Callable[[], None]:
    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_optimizer(args: argparse.Namespace, groups: list[dict], session: Session) -> torch.optim.Optimizer:
    """The optimizer ``args.optimizer`` over ``groups`` (from ``GPT.param_groups``)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=args.betas, foreach=True)
    process_group, ranks_per_node = None, args.ranks_per_node  # DistLion votes over the world group
    if args.optimizer == "lion" and session.distributed:
        # Global Lion: DDP has averaged the gradients, so each rank takes the Lion step alone.
        process_group, _ = dist.new_subgroups(group_size=1)
        ranks_per_node = 1
    options = {**from_flags(args), "process_group": process_group, "ranks_per_node": ranks_per_node}
    return DistLion(groups, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay,
                    vote_ema_beta=None if args.vote_ema_beta == "off" else args.vote_ema_beta, **options)


def _param_groups(model: GPT, args: argparse.Namespace) -> list[dict]:
    return model.param_groups(args.weight_decay, args.embedding_lr_scale)


def _distlion_bytes(optimizer: Any) -> Callable[[], int | None]:
    inner = unwrap(optimizer)
    return (lambda: inner.comm_stats.bytes_sent) if inner is not None else (lambda: None)


def _inter_node_bytes(optimizer: Any) -> int | None:
    """DistLion's bytes sent to other nodes so far (the vote; all it sends when a node is one rank)."""
    inner = unwrap(optimizer)
    return inner.comm_stats.inter_node_bytes_sent if inner is not None else None


def _constraint(optimizer: Any) -> dict | None:
    """DistLion's ``constraint_stats()`` (the box ||weight_decay * x||_inf <= 1 and its phase); None for
    AdamW. Every rank calls it: under FSDP2 it reduces over the shard group."""
    inner = unwrap(optimizer)
    return inner.constraint_stats() if inner is not None else None


def _describe_constraint(stats: dict | None) -> str:
    if stats is None or stats["scaled_max"] is None:
        return ""
    return (f"  max|wd*x| {stats['scaled_max']:.3f} ({stats['phase']}, {stats['fraction_outside']:.2%} outside, "
            f"{stats['fraction_at_boundary']:.2%} at the boundary)")


def _plain_batches(corpus, args, session: Session) -> Iterator:
    for step in range(args.steps):
        x, y = train_batch(corpus, step=step, rank=session.rank, world_size=session.world_size,
                           batch_size=args.batch_size, block_size=args.block_size, seed=args.seed)
        yield x.to(session.device), y.to(session.device)


def plain_engine(args, model: GPT, corpus, session: Session) -> Engine:
    """Single process or torchrun: DistLion bare; AdamW and global Lion inside DDP with a counting hook."""
    optimizer = build_optimizer(args, _param_groups(model, args), session)
    batches = _plain_batches(corpus, args, session)
    step = _step_and_clear(optimizer)
    if not session.distributed:
        return Engine(lambda x, y: model(x, y)[1], torch.Tensor.backward, step, optimizer, model, batches,
                      lambda: 0)
    if args.optimizer == "distlion":
        return Engine(lambda x, y: model(x, y)[1], torch.Tensor.backward, step, optimizer, model, batches,
                      _distlion_bytes(optimizer))
    ddp = DDP(model, device_ids=[session.device.index] if session.device.type == "cuda" else None)
    counter = AllReduceCounter.for_group(None)
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    return Engine(lambda x, y: ddp(x, y)[1], torch.Tensor.backward, step, optimizer, model, batches,
                  lambda: counter.bytes_sent)


def fsdp_engine(args, model: GPT, corpus, session: Session) -> Engine:
    """torchrun with FSDP2: blocks sharded over a node's ranks; DistLion votes across the replicas.

    AdamW is FSDP2's hybrid sharding over the whole mesh (reduce-scatter in the node,
    fp32 all-reduce across nodes), whose bytes are not counted (None).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if args.optimizer == "lion":
        raise SystemExit("--fsdp runs distlion or adamw; for global Lion use torchrun without --fsdp")
    if not session.distributed:
        raise SystemExit("--fsdp needs several processes: torchrun --nproc_per_node N -m launch.train --fsdp")
    per_node = args.ranks_per_node if args.ranks_per_node != "auto" else \
        int(os.environ.get("LOCAL_WORLD_SIZE", session.world_size))
    if session.world_size % per_node:
        raise SystemExit(f"--ranks_per_node {per_node} does not divide the {session.world_size} processes")
    if args.eval_sequences % session.world_size:
        raise SystemExit(f"--eval_sequences {args.eval_sequences}: use a multiple of the {session.world_size} "
                         f"processes (FSDP's ranks must run the same number of validation batches)")
    mesh = init_device_mesh(session.device.type, (session.world_size // per_node, per_node),
                            mesh_dim_names=("replicate", "shard"))
    shard_over = mesh["shard"] if args.optimizer == "distlion" else mesh
    for block in model.blocks:
        fully_shard(block, mesh=shard_over)
    fully_shard(model, mesh=shard_over)
    groups = _param_groups(model, args)
    if args.optimizer == "distlion":
        options = {**from_flags(args, skip=("ranks_per_node",)), "device_mesh": mesh}  # the mesh is the nodes
        optimizer = DistLion(groups, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay,
                             vote_ema_beta=None if args.vote_ema_beta == "off" else args.vote_ema_beta, **options)
    else:
        optimizer = build_optimizer(args, groups, session)
    return Engine(lambda x, y: model(x, y)[1], torch.Tensor.backward, _step_and_clear(optimizer), optimizer,
                  model, _plain_batches(corpus, args, session), _distlion_bytes(optimizer))


def accelerate_engine(args, model: GPT, corpus, session: Session) -> Engine:
    """Under `accelerate launch`: a sharded DataLoader, and prepare() from distlion for DistLion."""
    accelerator = session.accelerator
    optimizer = build_optimizer(args, _param_groups(model, args), session)
    loader = torch.utils.data.DataLoader(
        TrainWindows(corpus, steps=args.steps, world_size=session.world_size, batch_size=args.batch_size,
                     block_size=args.block_size, seed=args.seed), batch_size=args.batch_size, shuffle=False)
    if args.optimizer == "distlion":
        from distlion.accelerate import prepare

        wrapped, optimizer, loader = prepare(accelerator, model, optimizer, loader)
        bytes_sent = _distlion_bytes(optimizer)
    else:
        wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        bytes_sent = lambda: None  # noqa: E731
        if isinstance(wrapped, DDP):
            counter = AllReduceCounter.for_group(None)
            wrapped.register_comm_hook(counter, counting_allreduce_hook)
            bytes_sent = lambda: counter.bytes_sent  # noqa: E731
    return Engine(lambda x, y: wrapped(x, y)[1], accelerator.backward, _step_and_clear(optimizer), optimizer,
                  accelerator.unwrap_model(wrapped), iter(loader), bytes_sent)


def deepspeed_engine(args, model: GPT, corpus, session: Session) -> Engine:
    """Under the DeepSpeed launcher: initialize() from distlion for DistLion, deepspeed's own otherwise.

    DeepSpeed's gradient all-reduce is not counted (None) for AdamW and Lion.
    """
    if args.optimizer == "distlion":
        from distlion.deepspeed import initialize
    else:
        from deepspeed import initialize
    if args.optimizer == "distlion":
        # DistLion comes from the config's "DistLion" entry, as a DeepSpeed user writes it.
        engine, optimizer, _, _ = initialize(model=model, model_parameters=_param_groups(model, args),
                                             config=args.deepspeed_config)
    else:
        # A callable, so the optimizer is built on the parameters DeepSpeed has cast and moved.
        engine, optimizer, _, _ = initialize(model=model, model_parameters=_param_groups(model, args),
                                             optimizer=lambda groups: build_optimizer(args, groups, session),
                                             config=args.deepspeed_config)
    bytes_sent = _distlion_bytes(optimizer) if args.optimizer == "distlion" else (lambda: None)
    # engine.step() steps the optimizer and clears the gradients itself.
    return Engine(lambda x, y: engine(x, y)[1], engine.backward, engine.step, optimizer, engine.module,
                  _plain_batches(corpus, args, session), bytes_sent)


# ---------------------------------------------------------------------------- measuring

def parameter_digests(module: torch.nn.Module, session: Session) -> list[str]:
    """Return every rank's sha256 of its parameters' bytes (rank order)."""
    digest = hashlib.sha256()
    for param in module.parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2: the whole parameter
        digest.update(full.detach().float().cpu().contiguous().numpy().tobytes())
    mine = digest.hexdigest()[:16]
    if not session.distributed:
        return [mine]
    everyone: list[str] = [""] * session.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


class Progress:
    """tqdm bar on rank 0 (a log line per eval when tqdm is missing or --no_progress)."""

    def __init__(self, args, session: Session):
        self.bar = None
        self.enabled = session.rank == 0
        if self.enabled and not args.no_progress:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=args.steps, desc=args.optimizer, unit="step", dynamic_ncols=True)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- training

def train(args: argparse.Namespace) -> dict:
    """Train, evaluate every ``eval_interval`` steps, and return (and on rank 0 write) the metrics."""
    session = start_session(args)
    corpus = load_corpus(args.data)
    check_fits(corpus.train, args.block_size, "training")
    check_fits(corpus.val, args.block_size, "validation")
    torch.manual_seed(args.seed)  # the same initial weights on every rank: nothing to broadcast
    model = GPT(args.model).to(session.device)
    builder = (accelerate_engine if args.accelerate else deepspeed_engine if args.deepspeed_config
               else fsdp_engine if args.fsdp else plain_engine)
    engine = builder(args, model, corpus, session)
    tokens_per_step = session.world_size * args.batch_size * args.block_size
    progress = Progress(args, session)
    progress.log(f"{args.optimizer}: {args.model.num_parameters:,} parameters, {session.world_size} worker(s), "
                 f"{corpus.describe()}")

    history = [{"step": 0, "val_loss": evaluate(engine.module, corpus, args, session), "bytes_sent": 0,
                "inter_node_bytes_sent": 0, "train_loss": None, "elapsed_s": 0.0,
                "constraint": _constraint(engine.optimizer)}]
    step_times, optimizer_times, losses = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(step, args) * group.get("lr_scale", 1.0)
        x, y = next(engine.batches)
        loss = engine.forward(x, y)
        engine.backward(loss)
        _sync(session.device)
        t1 = time.perf_counter()
        engine.step()
        _sync(session.device)
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        optimizer_times.append(t2 - t1)
        losses.append(loss.item())
        sent = engine.bytes_sent()
        progress.update(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_step / (t2 - t0):,.0f}",
                        sent_MB=f"{sent / 1e6:.1f}" if sent is not None else "n/a")
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            interval = losses[-args.eval_interval:]
            history.append({"step": step + 1, "val_loss": evaluate(engine.module, corpus, args, session),
                            "train_loss": _mean(interval), "bytes_sent": sent,
                            "inter_node_bytes_sent": _inter_node_bytes(engine.optimizer),
                            "elapsed_s": time.perf_counter() - start,
                            "constraint": _constraint(engine.optimizer)})
            progress.log(f"step {step + 1:5d}  train {history[-1]['train_loss']:.4f}  "
                         f"val {history[-1]['val_loss']:.4f}{_describe_constraint(history[-1]['constraint'])}")
    wall = time.perf_counter() - start
    progress.close()

    digests = parameter_digests(engine.module, session)
    # Medians over the steps after the first few (allocation, warm-up): robust to a busy machine.
    steady = slice(min(5, args.steps - 1), None)
    sent = engine.bytes_sent()
    inner = unwrap(engine.optimizer)
    metrics = {
        "optimizer": args.optimizer,
        "vote": args.vote if args.optimizer == "distlion" else None,
        "k": args.k if args.optimizer != "adamw" else None,
        "exchange": inner.exchange_name if inner is not None and args.optimizer == "distlion" else None,
        "launcher": "accelerate" if args.accelerate else "deepspeed" if args.deepspeed_config else "torchrun",
        "fsdp": args.fsdp,
        "world_size": session.world_size,
        "device": str(session.device),
        "num_parameters": args.model.num_parameters,
        "corpus": corpus.describe(),
        "tokens_per_step": tokens_per_step,
        "config": {key: value for key, value in vars(args).items() if key not in ("model", "local_rank")},
        "history": history,
        "final_val_loss": history[-1]["val_loss"],
        "bytes_sent": sent,
        "bytes_sent_per_step": sent / args.steps if sent is not None else None,
        "fp32_allreduce_bytes_per_step": 2 * (session.world_size - 1) * 4 * args.model.num_parameters
        // session.world_size,
        "comm_stats": inner.comm_stats.as_dict() if inner is not None else None,
        "wall_time_s": wall,
        "step_time_s": _median(step_times[steady]),
        "optimizer_step_time_s": _median(optimizer_times[steady]),
        "tokens_per_s": tokens_per_step / _median(step_times[steady]),
        "parameter_digests": digests,
        "parameters_identical": len(set(digests)) == 1,
    }
    if session.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=str)
    per_step = "n/a" if sent is None else f"{sent / args.steps:,.0f}"
    progress.log(f"{args.optimizer}: final val loss {metrics['final_val_loss']:.4f}, "
                 f"{metrics['step_time_s'] * 1e3:.0f} ms/step, {per_step} bytes sent per worker per step, "
                 f"parameters identical on all ranks: {metrics['parameters_identical']}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()  # past this point only the interpreter teardown is left; see distlion/worker_exit.py
