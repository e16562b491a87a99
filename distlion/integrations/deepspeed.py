"""DeepSpeed: ``"type": "DistLion"`` in a DeepSpeed config, per-rank optimizer checkpoints.

DeepSpeed has no registry of optimizer types. Importing this module registers DistLion
by putting ``distlion.deepspeed.initialize`` in place of ``deepspeed.initialize`` (same
arguments, same return value; configs without DistLion go to DeepSpeed's own unchanged),
so every caller that looks up ``deepspeed.initialize`` when it runs, Accelerate's
DeepSpeed plugin and so the Hugging Face Trainer's ``deepspeed=`` included, accepts the
entry::

    # ds_config.json: "optimizer": {"type": "DistLion", "params": {"lr": 1e-4, "betas": [0.9, 0.99],
    #                                "weight_decay": 0.1, "vote": "majority"}}
    import deepspeed
    import distlion.deepspeed  # registers "DistLion"
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config="ds_config.json")
    loss = engine(batch); engine.backward(loss); engine.step()
    engine.save_checkpoint("ckpt")          # every rank also writes its own DistLion state

Launch with ``deepspeed --num_gpus N train.py`` or ``torchrun --nproc_per_node N train.py``.
A name bound before the import (``from deepspeed import initialize``) still refers to
DeepSpeed's own, which refuses the entry ("DistLion is not a supported DeepSpeed
Optimizer"): call ``distlion.deepspeed.initialize`` there. DistLion is deliberately not
put in ``torch.optim``, where DeepSpeed's fallback would find it and build an engine that
still all-reduces every gradient.

When the engine's optimizer is DistLion (built from the config entry, or a DistLion
instance passed as ``optimizer=``), ``initialize`` also:

- turns off the engine's gradient all-reduce: every rank keeps its own gradients and
  DistLion exchanges 1-bit signs instead. Under ``"bf16"`` / ``"fp16"`` DeepSpeed wraps
  DistLion in its unfused optimizer, which keeps fp32 copies (DistLion updates those);
  with the all-reduce off, that wrapper all-reduces its overflow flag itself, so every
  rank skips an overflow step together and the loss scales stay equal. In fp32, DistLion
  agrees on skips inside its own exchange (``comm_stats.skipped_steps``);
- wraps ``engine.save_checkpoint`` / ``engine.load_checkpoint`` so that every rank saves
  and restores its own optimizer state (``<dir>/<tag>/distlion_optimizer0_rank{r}_of_{N}.pt``,
  ``distlion.checkpoint``): at ZeRO stage 0 DeepSpeed writes rank 0's optimizer state only,
  and DistLion's momentum differs on every rank. A missing or mismatched file fails on
  every rank together, each waiting at most ``DistLion(timeout=...)`` for the others.

Checkpoints load without running code from them. DeepSpeed reads every checkpoint file
through its engine's ``checkpoint_engine.load``, which for plain torch files calls
``torch.load(weights_only=False)``: a crafted ``mp_rank_00_model_states.pt`` would run
code on every rank. For the duration of the wrapped ``load_checkpoint`` that method is
replaced, on this engine only, by ``load_file`` (``distlion.integrations.common``), which calls
``torch.load(weights_only=True)``: tensors and plain Python values only. That is all a
stage-0 DeepSpeed checkpoint holds (the module's and the optimizer's state dicts,
counters, the config as a dict, the version string), so nothing is added to torch's
allowlist. A file that needs more (a type of yours in ``client_state``) fails on every
rank with a ``ValueError`` naming the file and the refused type; if you trust the file,
call ``load_checkpoint`` inside ``torch.serialization.safe_globals([YourType])``.

ZeRO stages. DeepSpeed always runs at stage 0 under DistLion: its partitioning and its
full-precision gradient reduction are the traffic DistLion replaces. DistLion shards its
own state instead, inside each node (``ranks_per_node``; distlion/optim.py):

- stage 0: DistLion as configured (``ranks_per_node`` from the entry, default "auto");
- stage 1 and stage 2: the same, with the rest of ``"zero_optimization"`` ignored. With
  ``ranks_per_node`` G > 1, rank j of a node holds the momentum (and vote EMA) of chunk j,
  1/G of DistLion's state, as ZeRO-1 would, and the nodes vote; with G = 1 (one rank per
  node, or one node under "auto") every rank holds all of it. On a single node, G = the
  number of ranks makes the node one worker: sharded Lion, with no vote and no
  inter-node link to save (a warning says so); gradients are not partitioned (each rank keeps its full local ``.grad``;
  the node reduce-scatters them inside ``step()``), and under ``"bf16"`` / ``"fp16"``
  DeepSpeed's wrapper keeps fp32 copies of every parameter on every rank (DistLion
  updates those). ``offload_optimizer`` / ``offload_param`` are refused;
- stage 3 is refused: it partitions the parameters, and DistLion updates full replicas.
  The sharded-parameter route in PyTorch is FSDP2 (``torch.distributed.fsdp.fully_shard``).

Configs with any other optimizer go to DeepSpeed's own ``initialize`` unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from typing import Any

import torch

from distlion.integrations.common import (UnsupportedSetupError, distlion_of, fail_together, load_file,
                                          load_state, needs, save_state)
from distlion.optim import DistLion
from distlion.options import CONFIG_KEYS, DTYPE_KEYS, DistLionOptions, dtype_name

with needs("DeepSpeed", "deepspeed"):
    import deepspeed
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

logger = logging.getLogger("distlion.deepspeed")  # the name users configure logging by

# DeepSpeed's own initialize, kept when this module registers its own in its place (a reload finds ours there).
_deepspeed_initialize = getattr(deepspeed.initialize, "deepspeed_initialize", deepspeed.initialize)

OPTIMIZER_TYPE = "DistLion"
# What a "DistLion" entry's params may set: DistLion's options that JSON can hold (distlion.options).
CONFIG_PARAMS = CONFIG_KEYS
DTYPE_PARAMS = DTYPE_KEYS  # given by name in JSON: "float32", "bfloat16"
# Settings of DeepSpeed's ZeRO optimizer that DistLion cannot stand in for: refused, not ignored.
REFUSED_ZERO_KEYS = ("offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param")
# What load_checkpoint's errors tell the user to do (common.load_state fills in the saved world size).
_FIX = ("resume with {world_size} ranks and the saved ranks_per_node, or call load_checkpoint(..., "
        "load_optimizer_states=False) to keep the weights and start the optimizer fresh")
_MISSING = ("Save checkpoints from an engine built by distlion.deepspeed.initialize (plain DeepSpeed keeps rank 0's "
            "state only), or call load_checkpoint(..., load_optimizer_states=False) to keep the weights and start "
            "the optimizer fresh.")


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT, mpu: Any = None,
               dist_init_required: bool | None = None, collate_fn: Any = None, config: Any = None,
               mesh_param: Any = None, config_params: Any = None):
    """Initialize DeepSpeed like ``deepspeed.initialize``, building DistLion from a ``"DistLion"`` entry.

    Takes and returns what ``deepspeed.initialize`` does: ``(engine, optimizer,
    training_dataloader, lr_scheduler)``. As in DeepSpeed, an ``optimizer`` argument
    overrides the config's optimizer entry.

    For a DistLion engine, DeepSpeed runs at ZeRO stage 0 whatever stage the config
    names (stage 1 and 2: DistLion shards its own state within each node; module docstring).

    Raises:
        UnsupportedSetupError: for a DistLion engine under ZeRO stage 3 or with ZeRO
            offloading, or with model parallelism (``mpu`` or a pipeline model).
        ValueError: an unknown or invalid param in the entry.
    """
    forwarded = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                     training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
                     mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                     config_params=config_params)
    if mesh_param is not None:  # older DeepSpeed releases have no mesh_param
        forwarded["mesh_param"] = mesh_param
    source = config if config is not None else config_params
    from_args = source is None
    if from_args:
        source = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    ds_config = load_config(source) if source is not None else {}
    entry = ds_config.get("optimizer") or {}
    names_distlion = str(entry.get("type", "")).lower() == OPTIMIZER_TYPE.lower()
    if names_distlion and optimizer is not None:
        # DeepSpeed's rule: a client optimizer overrides the config's optimizer entry.
        logger.warning("DistLion: optimizer=%s was passed, so the config's \"DistLion\" entry %s is ignored",
                       type(optimizer).__name__, entry.get("params"))
    from_entry = names_distlion and optimizer is None
    requested_stage = _zero_stage(ds_config)
    rewritten = False
    if from_entry or isinstance(optimizer, DistLion):
        _check_supported(ds_config, mpu, model)  # before any collective: every rank raises, none waits
        if requested_stage > 0:
            ds_config, rewritten = _at_stage_zero(ds_config), True
    if from_entry:
        kwargs = distlion_kwargs(entry.get("params") or {})

        def build(params) -> DistLion:
            # DeepSpeed calls this once it has initialised torch.distributed and cast and
            # moved the model, so DistLion lays out the final parameters.
            return DistLion(params, **kwargs)

        # DeepSpeed rejects optimizer types it does not know, but takes a callable.
        ds_config = {key: value for key, value in ds_config.items() if key != "optimizer"}
        forwarded.update(optimizer=build)
        rewritten = True
    if rewritten:
        forwarded.update(config=ds_config, config_params=None)
    with _config_taken_from(args if rewritten and from_args else None):
        engine, ds_optimizer, dataloader, scheduler = _deepspeed_initialize(**forwarded)
    distlion = getattr(engine, "basic_optimizer", None)
    if isinstance(distlion, DistLion):  # also when a callable of the caller's built it
        if _zero_stage(ds_config) > 0:
            raise UnsupportedSetupError(
                f"A callable of yours built DistLion under ZeRO stage {_zero_stage(ds_config)}, so DeepSpeed wrapped "
                "it in its ZeRO optimizer. Pass a DistLion instance as optimizer= or name \"DistLion\" in the "
                "config, so that initialize runs DeepSpeed at stage 0 and DistLion shards its own state "
                "(ranks_per_node).")
        _attach(engine, distlion)
        logger.info("DistLion: DeepSpeed engine ready (%s, world size %d, %s, %s exchange); config ZeRO stage %d, "
                    "DeepSpeed runs at stage 0 with its gradient all-reduce off; ranks_per_node=%d: each rank holds "
                    "1/%d of DistLion's state", type(engine.optimizer).__name__, distlion.world_size,
                    distlion.topology.describe(), distlion.exchange_name, requested_stage, distlion.ranks_per_node,
                    distlion.ranks_per_node)
        if requested_stage > 0 and distlion.ranks_per_node == 1 and distlion.world_size > 1:
            logger.warning(_unsharded_warning(requested_stage, distlion.world_size))
    return engine, ds_optimizer, dataloader, scheduler


def register() -> None:
    """Put ``initialize`` in place of ``deepspeed.initialize``; done once when this module is imported."""
    initialize.deepspeed_initialize = _deepspeed_initialize
    deepspeed.initialize = initialize


register()


def load_config(config: Any) -> dict:
    """Return a DeepSpeed config as a dict: a dict, a path to a JSON (hjson) file, or base64 JSON."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config) as handle:
            return _parse_json(handle.read())
    if isinstance(config, str):
        import base64
        import binascii
        try:
            return _parse_json(base64.urlsafe_b64decode(config).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
    raise ValueError(f"DeepSpeed config {config!r} is neither a dict, a path to an existing JSON file, nor "
                     "base64-encoded JSON; pass config=<dict or path>")


def distlion_kwargs(params: dict) -> dict:
    """Turn the ``"params"`` of a ``"DistLion"`` config entry into ``DistLion`` keyword arguments, checked
    (``DistLionOptions``) before DeepSpeed starts, so every rank raises alike."""
    unknown = sorted(set(params) - set(CONFIG_PARAMS))
    if unknown:
        raise ValueError(f"Unknown DistLion param(s) {unknown} in the DeepSpeed config; DistLion takes "
                         f"{list(CONFIG_PARAMS)} (no eps: Lion has no denominator)")
    kwargs = dict(params)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    for key in DTYPE_PARAMS:
        if isinstance(kwargs.get(key), str):
            try:
                kwargs[key] = getattr(torch, dtype_name(kwargs[key], key))
            except ValueError as error:
                raise ValueError(f"Invalid {key} {kwargs[key]!r} in the DeepSpeed config; use a torch dtype name "
                                 "such as \"float32\" or \"bfloat16\"") from error
    DistLionOptions(**kwargs)
    return kwargs


def get_distlion(engine) -> DistLion:
    """Return ``distlion.unwrap(engine)``: the DistLion under any fp16/bf16 wrapper; raise if there is none."""
    return distlion_of(engine, "get_distlion", "build the engine with distlion.deepspeed.initialize and a "
                                               "\"DistLion\" config entry (or optimizer=DistLion(...))")


def _unsharded_warning(stage: int, world_size: int) -> str:
    """What to say when ZeRO ``stage`` asks for sharded state but every one of ``world_size`` ranks votes alone.

    ``ranks_per_node`` G shards DistLion's state within a node and makes the node one voter.
    Across nodes that keeps the vote; on a single node it leaves one voter: sharded Lion, with
    nothing sent in 1 bit and no inter-node link to save.
    """
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")  # as "auto" reads it
    asked = (f"DistLion: ZeRO stage {stage} asks for sharded optimizer state, but ranks_per_node is 1: each of the "
             f"{world_size} ranks votes and holds all of DistLion's state.")
    if local is not None and local.isdigit() and int(local) >= world_size:
        return (f"{asked} The {world_size} ranks are one node. \"ranks_per_node\": {world_size} would shard the "
                f"state (1/{world_size} per rank) and make the node a single voter: sharded Lion with no vote and no "
                f"inter-node link to save (the gradients are reduce-scattered in the node at full precision, as "
                f"under ZeRO-2). Keep ranks_per_node 1 for the 1-bit vote between ranks, or set it to "
                f"{world_size} for sharded Lion.")
    return (f"{asked} On several nodes, set \"ranks_per_node\" in the DistLion entry to the ranks per node (or "
            f"launch so that LOCAL_WORLD_SIZE is set and keep \"auto\"): each rank then holds 1/G of the state and "
            f"the nodes vote.")


# ---------------------------------------------------------------------- checks

def _zero_stage(ds_config: dict) -> int:
    zero = ds_config.get("zero_optimization", {})
    if isinstance(zero, bool):  # DeepSpeed's deprecated form: true means stage 1
        return int(zero)
    try:
        return int(zero.get("stage", 0))
    except (TypeError, ValueError):
        return 0  # not a number ("auto"): DeepSpeed itself rejects it with its own message


def _check_supported(ds_config: dict, mpu: Any, model: Any) -> None:
    """Raise on every rank, before any collective, for setups DistLion cannot run (so nothing hangs)."""
    stage = _zero_stage(ds_config)
    if stage >= 3:
        raise UnsupportedSetupError(
            f"DistLion does not support ZeRO stage {stage}: stage 3 partitions the parameters themselves, and "
            "DistLion updates full replicas of them. For sharded parameters use FSDP2 "
            "(torch.distributed.fsdp.fully_shard). For sharded optimizer state with DistLion, use "
            '"zero_optimization": {"stage": 1} or {"stage": 2}: DistLion shards its state within each node '
            '("ranks_per_node" in the DistLion entry).')
    zero = ds_config.get("zero_optimization")
    refused = [key for key in REFUSED_ZERO_KEYS if isinstance(zero, dict) and _offloads(zero.get(key))]
    if refused:
        raise UnsupportedSetupError(
            f"DistLion cannot use zero_optimization.{refused[0]} = {zero[refused[0]]!r}: offloading belongs to "
            "DeepSpeed's ZeRO optimizer, and under DistLion DeepSpeed runs at stage 0 while DistLion keeps its "
            "state on the device, sharded within each node (\"ranks_per_node\"). Remove "
            f"{' and '.join(refused)} from \"zero_optimization\".")
    if mpu is not None or isinstance(model, deepspeed.PipelineModule):
        raise UnsupportedSetupError("distlion.deepspeed supports data parallelism only (no mpu, no PipelineModule): "
                         "DistLion votes over the whole world group. Build DistLion(process_group=<your "
                         "data-parallel group>) and pass it to deepspeed.initialize yourself.")


def _offloads(setting: Any) -> bool:
    """True when a ZeRO offload setting asks for offloading (a device other than "none", or True)."""
    if isinstance(setting, dict):
        return str(setting.get("device", "none")).lower() != "none"
    return bool(setting)


def _at_stage_zero(ds_config: dict) -> dict:
    """Return ``ds_config`` with ZeRO stage 0: DistLion shards its own state, DeepSpeed must not."""
    zero = ds_config.get("zero_optimization")
    ignored = sorted(key for key in zero if key != "stage") if isinstance(zero, dict) else []
    if ignored:
        logger.info("DistLion: DeepSpeed runs at ZeRO stage 0; ignoring zero_optimization settings %s", ignored)
    return {**ds_config, "zero_optimization": {"stage": 0}}


def _parse_json(text: str) -> dict:
    try:
        import hjson  # DeepSpeed's own parser (a DeepSpeed dependency): allows comments
        return hjson.loads(text, object_pairs_hook=dict)
    except ImportError:
        return json.loads(text)


@contextmanager
def _config_taken_from(args: Any):
    """Hide ``args.deepspeed_config`` while DeepSpeed runs: it rejects a config passed twice."""
    saved = {name: getattr(args, name) for name in ("deepspeed_config", "deepscale_config")
             if getattr(args, name, None) is not None}
    for name in saved:
        setattr(args, name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


# --------------------------------------------------------------- engine setup

def _attach(engine, optimizer: DistLion) -> None:
    """Turn off the gradient all-reduce, undo the wrappers' warm-up step, and add per-rank checkpoints."""
    # Each rank must keep its own gradients: DistLion sends their signs instead.
    engine.enable_backward_allreduce = False
    if engine.optimizer is not optimizer and hasattr(engine.optimizer, "refresh_fp32_params"):
        # DeepSpeed's unfused fp16/bf16 wrapper calls step() once with zero gradients to
        # create optimizer state; for Lion that is a real ±lr step (and a decay) on its fp32
        # copies. Copy the untouched model weights back so training starts where it should,
        # and forget that step's exchange so comm_stats counts training steps only.
        engine.optimizer.refresh_fp32_params()
        optimizer.comm_stats.reset()  # in place: the exchange holds this object
    checkpoints = _PerRankCheckpoints(engine, optimizer)
    engine.save_checkpoint = checkpoints.save_checkpoint
    engine.load_checkpoint = checkpoints.load_checkpoint


class _PerRankCheckpoints:
    """``save_checkpoint`` / ``load_checkpoint`` that also save and restore every rank's optimizer state."""

    def __init__(self, engine, optimizer: DistLion):
        self.engine = engine
        self.optimizer = optimizer
        self._save = engine.save_checkpoint  # DeepSpeed's own, bound to the engine
        self._load = engine.load_checkpoint

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """Save a DeepSpeed checkpoint plus this rank's optimizer state; call on every rank."""
        tag = f"global_step{self.engine.global_steps}" if tag is None else str(tag)
        # Written before DeepSpeed's save, whose first barrier then guarantees every rank's
        # file exists before rank 0 writes the "latest" tag.
        save_state(self.engine.optimizer.state_dict(), os.path.join(save_dir, tag), self.optimizer)
        return self._save(save_dir, tag=tag, client_state={} if client_state is None else client_state,
                          save_latest=save_latest, **kwargs)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, **kwargs):
        """Load a DeepSpeed checkpoint and this rank's own optimizer state; call on every rank.

        Every file is read with ``torch.load(weights_only=True)`` (module docstring).
        """
        if not load_optimizer_states or load_module_only:
            loaded = self._deepspeed_load(load_dir, tag=tag, load_module_strict=load_module_strict,
                                          load_optimizer_states=load_optimizer_states,
                                          load_lr_scheduler_states=load_lr_scheduler_states,
                                          load_module_only=load_module_only, **kwargs)
            if loaded[0] is not None and hasattr(self.engine.optimizer, "refresh_fp32_params"):
                # DeepSpeed refreshes the fp32 copies only for load_module_only; without
                # this, the first step would write the stale copies over the loaded weights.
                self.engine.optimizer.refresh_fp32_params()
            return loaded
        if tag is None:
            tag = _latest_tag(load_dir)
            if tag is None:  # DeepSpeed warns and returns (None, None)
                return self._deepspeed_load(load_dir, tag=None, load_module_strict=load_module_strict,
                                            load_lr_scheduler_states=load_lr_scheduler_states, **kwargs)
        # Read (and check) this rank's state before touching the model, so a bad checkpoint
        # fails on every rank together instead of half-loading.
        directory = os.path.join(load_dir, str(tag))
        state = fail_together(lambda: load_state(directory, self.optimizer, fix=_FIX, missing=_MISSING),
                              source=directory, timeout=self.optimizer.timeout)
        # DeepSpeed would give every rank rank 0's optimizer state: load the weights and
        # everything else through it, and this rank's own optimizer state here.
        load_path, client_state = self._deepspeed_load(load_dir, tag=tag, load_module_strict=load_module_strict,
                                                       load_optimizer_states=False,
                                                       load_lr_scheduler_states=load_lr_scheduler_states,
                                                       load_module_only=False, **kwargs)
        if load_path is None:
            return load_path, client_state
        # DistLion's own checks (layout, vote) can still fail here, after DeepSpeed's load.
        fail_together(lambda: self.engine.optimizer.load_state_dict(state), source=directory,
                      timeout=self.optimizer.timeout)
        client_state["optimizer"] = state  # what DeepSpeed returns there, for this rank
        return load_path, client_state

    def _deepspeed_load(self, load_dir, **kwargs):
        """Run DeepSpeed's own load_checkpoint with weights-only reads; a failure on any rank fails every rank."""
        # At ZeRO stage 0 DeepSpeed's load makes no collective, so the one in fail_together pairs up.
        with _weights_only_reads(self.engine.checkpoint_engine):
            return fail_together(lambda: self._load(load_dir, **kwargs), source=str(load_dir),
                                 timeout=self.optimizer.timeout)


@contextmanager
def _weights_only_reads(checkpoint_engine):
    """Make ``checkpoint_engine.load`` (DeepSpeed's reader of every checkpoint file) load weights only."""
    own = vars(checkpoint_engine).get("load")  # an instance attribute to restore, if one was set

    def load(path, map_location=None):
        return load_file(path, kind="DeepSpeed checkpoint file", map_location=map_location)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        if own is None:
            del checkpoint_engine.load  # the class's method again
        else:
            checkpoint_engine.load = own


def _latest_tag(load_dir: str) -> str | None:
    """Return the tag in ``<load_dir>/latest``, as DeepSpeed reads it, or None when there is none."""
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as handle:
        return handle.read().strip()
