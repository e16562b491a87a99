"""DeepSpeed jobs that tests/test_deepspeed.py runs on gloo processes (tests/multiprocess.py).

Each job builds engines through ``distlion.deepspeed.initialize``, trains a small MLP on
rank-dependent data, and returns plain tensors and numbers for the tests to assert on:

    train_all       fp32, bf16 and fp16 engines for 2*K steps (an inf in rank 1's gradient
                    at INF_STEP, a checkpoint after step K); DistLion without DeepSpeed;
                    gradient accumulation; an AdamW config passing through
    resume_all      fresh engines that load the step-K checkpoints and train to 2*K
    load_elsewhere  load the 2-rank checkpoints with another world size: the error, then
                    the weights alone; a checkpoint without the per-rank files
    load_crafted    save a checkpoint, replace its model-states file with pickles that would
                    run code when loaded (torch.save and plain pickle), load each
    nodes_all       4 ranks as 2 nodes of 2 under ZeRO stage 1 (fp32, ranks_per_node=2) and
                    stage 2 (bf16, "auto" from the launcher's LOCAL_SIZE): train, checkpoint,
                    resume in fresh engines; ranks_per_node=1's state and its failed load of
                    the node checkpoint; DistLion alone; stage 3 refused

DeepSpeed runs on CPU here: its accelerator falls back to CPU and gloo by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shlex
import shutil

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator

from distlion import DistLion, unwrap
from distlion.deepspeed import distlion_kwargs, get_distlion, initialize

K = 3                      # checkpoint after step K, train to 2*K
INF_STEP, INF_RANK = 1, 1  # 0-based step at which rank INF_RANK's gradient gets an inf
BATCH = 8
PRECISIONS = ("fp32", "bf16", "fp16")
DISTLION_PARAMS = {"lr": 1e-2, "betas": [0.9, 0.99], "weight_decay": 0.1, "vote": "majority"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "launch", "deepspeed")


def _prepare(rank: int, world_size: int) -> None:
    """Set what the deepspeed launcher would, and skip a JIT build training never uses."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for inference
    # (minutes on 2 cores, cold cache); training never calls it. Marked incompatible,
    # DeepSpeed uses plain torch.distributed instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _allow_fp16_on_cpu() -> None:
    """Let DeepSpeed run fp16 on a CPU without oneDNN fp16 kernels (AVX512-FP16 / AMX).

    DeepSpeed's CPU accelerator reports fp16 support from oneDNN's fp16 kernels, and
    without them ``initialize`` refuses with "Type fp16 is not supported on your device".
    torch runs fp16 on any CPU (slowly), which is all the loss-scaling logic needs.
    """
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True


def _precisions(rank: int, world_size: int) -> tuple[str, ...]:
    """Set up this rank for every precision (fp16 on CPU included) and return them."""
    _prepare(rank, world_size)
    _allow_fp16_on_cpu()
    return PRECISIONS


def ds_config(precision: str, stage: int = 0, name: str = "ds_config_distlion.json", **params) -> dict:
    """Return a shipped bf16 DistLion config, switched to ``precision``, ZeRO ``stage`` and the test's params."""
    with open(os.path.join(CONFIG_DIR, name)) as handle:
        config = json.load(handle)
    config.update(train_micro_batch_size_per_gpu=BATCH)
    config["zero_optimization"]["stage"] = stage
    config["optimizer"]["params"] = {**config["optimizer"]["params"], **DISTLION_PARAMS, **params}
    config.pop("bf16", None)
    if precision == "fp32":
        # DeepSpeed clips each rank's own gradient (norm 1.0 by default); without it the
        # fp32 trajectory must equal DistLion's without DeepSpeed, bit for bit.
        config["gradient_clipping"] = 0.0
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        # Dynamic loss scaling from 2**8: a tiny model never overflows on its own here.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    return config


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank (DeepSpeed broadcasts rank 0's anyway)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def batch(rank: int, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Return rank- and step-dependent data, the same in every launch."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, 16, generator=generator)
    y = torch.randn(BATCH, 4, generator=generator)
    return x.to(dtype), y


def loss_of(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(module(x).float(), y)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    """Return the parameters as one fp32 vector (exact for bf16/fp16 values)."""
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def flat_state(engine) -> dict[str, torch.Tensor]:
    """Return DistLion's parameters (fp32 copies under bf16/fp16) and this rank's momentum."""
    optimizer = get_distlion(engine)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {"params": torch.cat([p.detach().float().flatten() for p in params]),
            "momentum": torch.cat([optimizer.state[p]["exp_avg"].flatten() for p in params]).clone()}


def new_engine(precision: str, config: dict | None = None):
    model = build_model()
    engine, optimizer, _, _ = initialize(model=model, model_parameters=model.parameters(),
                                         config=config or ds_config(precision))
    return engine, optimizer


def train_steps(engine, rank: int, steps: range, *, save_dir: str | None = None) -> dict:
    """Train ``steps`` and return per-step facts; save a checkpoint after step K if ``save_dir``."""
    distlion = get_distlion(engine)
    dtype = next(engine.module.parameters()).dtype
    out = {"params": [], "masters": [], "skipped": [], "distlion_skipped": [], "loss_scale": []}
    for step in steps:
        x, y = batch(rank, step, dtype)
        engine.backward(loss_of(engine, x, y))
        if step == INF_STEP and rank == INF_RANK:
            next(engine.module.parameters()).grad.view(-1)[0] = float("inf")
        engine.step()
        out["params"].append(flat_params(engine.module))
        out["masters"].append(flat_state(engine)["params"])
        out["skipped"].append(engine.skipped_steps)
        out["distlion_skipped"].append(distlion.comm_stats.skipped_steps)
        out["loss_scale"].append(float(getattr(engine.optimizer, "loss_scale", 1.0)))
        if save_dir is not None and step + 1 == K:
            engine.save_checkpoint(save_dir)
            out["momentum_at_k"] = flat_state(engine)["momentum"]
    out["final"] = flat_state(engine)
    out["global_steps"] = engine.global_steps
    out["comm_stats"] = distlion.comm_stats.as_dict()
    return out


def first_gradients(engine, rank: int) -> dict:
    """Return the gradients ``engine.backward`` leaves and those of plain local autograd."""
    dtype = next(engine.module.parameters()).dtype
    reference = build_model().to(dtype)  # a plain copy: no DeepSpeed hooks
    reference.load_state_dict(engine.module.state_dict())
    x, y = batch(rank, 0, dtype)
    loss_of(reference, x, y).backward()
    engine.backward(loss_of(engine, x, y))
    grads = [p.grad.detach().clone() for p in engine.module.parameters()]
    engine.optimizer.zero_grad()  # an untaken step: the training below starts from step 0
    return {"engine": grads, "local": [p.grad for p in reference.parameters()]}


def distlion_alone(model: torch.nn.Module, **extra):
    """Return DistLion with the config entry's settings (and ``extra``), without DeepSpeed."""
    return DistLion(model.parameters(), **distlion_kwargs({**DISTLION_PARAMS, **extra}))


def plain_distlion(rank: int, **extra) -> list[torch.Tensor]:
    """Train the fp32 model with DistLion and no DeepSpeed; return the parameters after each step."""
    model = build_model()
    optimizer = distlion_alone(model, **extra)
    history = []
    for step in range(2 * K):
        x, y = batch(rank, step, torch.float32)
        loss_of(model, x, y).backward()
        if step == INF_STEP and rank == INF_RANK:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        optimizer.step()
        optimizer.zero_grad()
        history.append(flat_params(model))
    return history


def accumulate(rank: int, micro_steps: int = 2, steps: int = 2) -> dict:
    """Train fp32 with gradient accumulation, in DeepSpeed and with DistLion alone."""
    config = ds_config("fp32")
    config["gradient_accumulation_steps"] = micro_steps
    engine, _ = new_engine("fp32", config)
    model = build_model()
    plain = distlion_alone(model)
    out = {"engine": [], "plain": []}
    for step in range(steps):
        for micro in range(micro_steps):
            x, y = batch(rank, micro_steps * step + micro, torch.float32)
            engine.backward(loss_of(engine, x, y))
            engine.step()  # steps the optimizer only at the accumulation boundary
            (loss_of(model, x, y) / micro_steps).backward()  # what DeepSpeed does with the loss
        plain.step()
        plain.zero_grad()
        out["engine"].append(flat_params(engine.module))
        out["plain"].append(flat_params(model))
    out["exchanges"] = get_distlion(engine).comm_stats.steps
    return out


def from_args(rank: int) -> dict:
    """Build an engine from ``args.deepspeed_config`` (the shipped file), as launch scripts do."""
    path = os.path.join(CONFIG_DIR, "ds_config_distlion.json")
    args = argparse.Namespace(deepspeed_config=path, local_rank=rank)
    model = build_model()
    engine, _, _, _ = initialize(args=args, model=model, model_parameters=model.parameters())
    x, y = batch(rank, 0, torch.bfloat16)
    engine.backward(loss_of(engine, x, y))
    engine.step()
    distlion = get_distlion(engine)
    return {"args_config": args.deepspeed_config, "path": path, "lr": distlion.param_groups[0]["lr"],
            "allreduce_enabled": engine.enable_backward_allreduce, "steps": distlion.comm_stats.steps,
            "params": flat_params(engine.module)}


def train_all(rank: int, world_size: int, checkpoint_root: str) -> dict:
    """Train every precision with an injected inf, checkpoint at K; try AdamW."""
    results = {}
    for precision in _precisions(rank, world_size):
        engine, optimizer = new_engine(precision)
        distlion = get_distlion(engine)
        result = {
            "wrapper": type(engine.optimizer).__name__,
            "returned_optimizer_is_engine_optimizer": optimizer is engine.optimizer,
            "unwrap_finds_distlion": all(unwrap(obj) is distlion for obj in (engine, engine.optimizer, optimizer)),
            "allreduce_enabled": engine.enable_backward_allreduce,
            "hyperparameters": {key: distlion.param_groups[0][key] for key in ("lr", "betas", "weight_decay")},
            "vote": distlion.vote,
            "world_size": distlion.world_size,
            "padded_numel": [bucket.padded_numel for bucket in distlion.layout.buckets],
            "numel": sum(p.numel() for p in engine.module.parameters()),
            "steps_before_training": distlion.comm_stats.steps,
            "initial_params": flat_params(engine.module),
            "initial_masters": flat_state(engine)["params"],
            "model_init": flat_params(build_model()),
        }
        result["grads"] = first_gradients(engine, rank)
        result.update(train_steps(engine, rank, range(2 * K), save_dir=os.path.join(checkpoint_root, precision)))
        results[precision] = result

    results["plain_fp32"] = plain_distlion(rank)
    results["accumulate"] = accumulate(rank)
    results["from_args"] = from_args(rank)
    with open(os.path.join(CONFIG_DIR, "ds_config_adamw.json")) as handle:
        adamw = json.load(handle)
    adamw["optimizer"]["params"]["torch_adam"] = True  # FusedAdam needs CUDA
    adamw.update(train_micro_batch_size_per_gpu=BATCH)
    engine, _ = new_engine("bf16", adamw)
    results["adamw"] = {"optimizer": type(engine.basic_optimizer).__name__,
                        "allreduce_enabled": engine.enable_backward_allreduce}
    results["zero2_one_node"] = zero_on_one_node(world_size)
    return results


def zero_on_one_node(world_size: int) -> dict:
    """ZeRO stage 2 on one node of ``world_size`` ranks (as torchrun sets LOCAL_WORLD_SIZE): every rank stays
    a voter, and the warning says what ranks_per_node would give there instead."""
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    logs = _LogRecorder("distlion.deepspeed")
    try:
        engine, _ = new_engine("fp32", ds_config("fp32", 2))
        return {"ranks_per_node": get_distlion(engine).ranks_per_node,
                "warnings": [message for message in logs.messages if "asks for sharded optimizer state" in message]}
    finally:
        logging.getLogger("distlion.deepspeed").removeHandler(logs)
        del os.environ["LOCAL_WORLD_SIZE"]


def resume_all(rank: int, world_size: int, checkpoint_root: str) -> dict:
    """Load each precision's step-K checkpoint in fresh engines and train to 2*K."""
    results = {}
    for precision in _precisions(rank, world_size):
        engine, _ = new_engine(precision)
        load_path, client_state = engine.load_checkpoint(os.path.join(checkpoint_root, precision))
        result = {"load_path": load_path, "global_steps_loaded": engine.global_steps,
                  "client_state_keys": sorted(client_state),
                  "momentum_loaded": flat_state(engine)["momentum"]}
        result.update(train_steps(engine, rank, range(K, 2 * K)))
        results[precision] = result
    return results


def _tag_directory(save_dir: str) -> str:
    with open(os.path.join(save_dir, "latest")) as handle:
        return os.path.join(save_dir, handle.read().strip())


def _momentum(optimizer) -> torch.Tensor:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return torch.cat([optimizer.state[p]["exp_avg"].flatten() for p in params]).clone()


def load_elsewhere(rank: int, world_size: int, checkpoint_root: str) -> dict:
    """Load 2-rank checkpoints with this world size: fp32's maps the momenta (the engine's load, DistLion alone
    from DeepSpeed's files, and the engine from DistLion alone's); bf16's wrapper state is refused, and its
    weights alone load."""
    import distlion

    _prepare(rank, world_size)
    out = {}
    for precision in ("fp32", "bf16"):
        engine, _ = new_engine(precision)
        directory = os.path.join(checkpoint_root, precision)
        try:
            engine.load_checkpoint(directory)
            out[precision] = {"error": None, "loaded_momentum": flat_state(engine)["momentum"]}
        except ValueError as error:
            out[precision] = {"error": str(error)}
        engine, _ = new_engine(precision)
        load_path, _ = engine.load_checkpoint(directory, load_optimizer_states=False)
        out[precision].update(load_path=load_path, params=flat_params(engine.module), state=flat_state(engine))
    # DeepSpeed's fp32 checkpoint resumed without DeepSpeed, and DistLion alone's resumed in DeepSpeed.
    alone = distlion_alone(build_model())
    distlion.load(alone, _tag_directory(os.path.join(checkpoint_root, "fp32")))
    out["alone_from_deepspeed"] = _momentum(alone)
    distlion.save(alone, os.path.join(checkpoint_root, "alone"))
    engine, _ = new_engine("fp32")
    distlion.load(engine.optimizer, os.path.join(checkpoint_root, "alone"))
    out["deepspeed_from_alone"] = flat_state(engine)["momentum"]
    # What plain DeepSpeed saves: the same checkpoint without the per-rank files.
    plain = os.path.join(checkpoint_root, "without_rank_files")
    shutil.copytree(os.path.join(checkpoint_root, "fp32"), plain,
                    ignore=shutil.ignore_patterns("distlion_optimizer*"))
    try:
        engine.load_checkpoint(plain)
        out["without_rank_files"] = None
    except ValueError as error:
        out["without_rank_files"] = str(error)
    return out


MARKER = "code_ran"  # the file a crafted checkpoint creates when unpickling it runs code
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's weights, read by every rank
CRAFTED = ("torch_save", "pickle")


class RunsCode:
    """Unpickles by running ``touch <path>`` in a shell: what a malicious checkpoint can do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (shlex.join(["touch", self.path]),)


def load_crafted(rank: int, world_size: int, checkpoint_root: str) -> dict:
    """Save a checkpoint, replace its model-states file with crafted pickles, load each on every rank."""
    _prepare(rank, world_size)
    engine, _ = new_engine("fp32")
    engine.save_checkpoint(checkpoint_root, tag="crafted")
    path = os.path.join(checkpoint_root, "crafted", MODEL_STATES)
    crafted = {"module": RunsCode(os.path.join(checkpoint_root, MARKER))}
    out = {}
    for form in CRAFTED:
        torch.distributed.barrier()  # every rank is done with the previous file
        if rank == 0:
            if form == "torch_save":
                torch.save(crafted, path)
            else:
                with open(path, "wb") as handle:
                    pickle.dump(crafted, handle, protocol=2)  # torch.load's own protocol: reaches the GLOBAL
        torch.distributed.barrier()
        try:
            engine.load_checkpoint(checkpoint_root)
            out[form] = {"error": None}
        except Exception as error:  # what each rank raised, for the test to compare
            out[form] = {"error": type(error).__name__, "message": str(error)}
    out["reader_restored"] = "load" not in vars(engine.checkpoint_engine)
    total = torch.tensor([1])
    torch.distributed.all_reduce(total)  # every rank returned from the loads: a collective still pairs up
    out["ranks_after"] = int(total)
    return out


NODE_RANKS = 2  # nodes_all runs 4 ranks as 2 nodes of 2
# name -> (precision, shipped config, ZeRO stage, extra DistLion params)
NODE_RUNS = {"zero1_fp32": ("fp32", "ds_config_distlion.json", 1, {"ranks_per_node": NODE_RANKS}),
             "zero2_bf16": ("bf16", "ds_config_distlion_zero2.json", 2, {})}


def state_numel(optimizer: DistLion) -> int:
    """Elements of the optimizer state this rank holds (momentum, master weights, vote EMA)."""
    return sum(t.numel() for state in optimizer.state.values() for t in state.values())


class _LogRecorder(logging.Handler):
    """Keep the messages of one logger (INFO and up)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def nodes_all(rank: int, world_size: int, checkpoint_root: str) -> dict:
    """ZeRO 1 and 2 configs on 2 nodes of 2: train with a checkpoint at K, resume, try what must fail."""
    _prepare(rank, world_size)
    # What the deepspeed launcher sets on a node of NODE_RANKS processes ("auto" reads it).
    os.environ.update(LOCAL_SIZE=str(NODE_RANKS), LOCAL_RANK=str(rank % NODE_RANKS))
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    logs = _LogRecorder("distlion.deepspeed")
    results = {}
    for name, (precision, config_name, stage, params) in NODE_RUNS.items():
        config = ds_config(precision, stage, config_name, **params)
        save_dir = os.path.join(checkpoint_root, name)
        engine, _ = new_engine(precision, config)
        result = {"ranks_per_node": get_distlion(engine).ranks_per_node, "state_numel":
                  state_numel(get_distlion(engine)), "deepspeed_stage": engine.zero_optimization_stage()}
        result.update(train_steps(engine, rank, range(2 * K), save_dir=save_dir))
        engine, _ = new_engine(precision, config)  # a fresh engine resumes from step K
        engine.load_checkpoint(save_dir)
        result["resumed"] = train_steps(engine, rank, range(K, 2 * K))
        results[name] = result
    # One rank per node: the whole state on every rank; the 2-rank-node checkpoint loads by the mean rule,
    # and loads alike into DistLion alone (the ZeRO-1 job resumed without DeepSpeed).
    import distlion

    engine, _ = new_engine("fp32", ds_config("fp32", 1, ranks_per_node=1))
    results["flat"] = {"state_numel": state_numel(get_distlion(engine)), "load_error": None}
    try:
        engine.load_checkpoint(os.path.join(checkpoint_root, "zero1_fp32"))
        results["flat"]["momentum"] = flat_state(engine)["momentum"]
    except ValueError as error:
        results["flat"]["load_error"] = str(error)
    alone = distlion_alone(build_model(), ranks_per_node=1)
    distlion.load(alone, _tag_directory(os.path.join(checkpoint_root, "zero1_fp32")))
    results["flat"]["alone_momentum"] = _momentum(alone)
    results["plain_fp32"] = plain_distlion(rank, ranks_per_node=NODE_RANKS)
    try:
        new_engine("fp32", ds_config("fp32", 3))
        results["stage3_error"] = None
    except ValueError as error:
        results["stage3_error"] = str(error)
    results["logs"] = logs.messages
    return results
