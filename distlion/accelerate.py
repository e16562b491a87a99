"""Hugging Face Accelerate adapter: DistLion in ``accelerate launch`` jobs.

A stock Accelerate script changes two lines::

    optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1)     # was AdamW(...)
    model, optimizer, loader, scheduler = distlion.accelerate.prepare(       # was accelerator.prepare(
        accelerator, model, optimizer, loader, scheduler)

and is launched as always::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train.py   # CPU, gloo
    accelerate launch --config_file launch/accelerate/1node_8gpu.yaml train.py          # GPUs, NCCL

What ``prepare`` adds to ``accelerator.prepare`` when a DistLion optimizer is among
the objects (with any other optimizer it is ``accelerator.prepare`` and nothing else):

- DDP's gradient all-reduce is stopped on every prepared model that holds DistLion's
  parameters (a comm hook that hands DDP back the local gradients): each rank keeps its
  own gradients and DistLion exchanges 1 bit per parameter instead.
- ``accelerator.save_state(dir)`` also writes ``distlion_optimizer{i}_rank{r}_of_{N}.pt``
  (``distlion.checkpoint``) from every rank (Accelerate writes ``optimizer.bin`` from the
  main process only, and momentum differs on every rank), and ``accelerator.load_state(dir)``
  gives each rank back its own file. A directory saved without DistLion, or by another
  number of processes, fails on every rank with an error that says what was found and
  what was expected.
- ``save_state`` and ``save_model`` write every weight: parameters are views of DistLion's
  flat buckets, which Accelerate's safetensors writer would take for tied weights and drop,
  so ``accelerator.get_state_dict`` returns CPU copies of them.
- ``optimizer.step_was_skipped`` is True on every rank when DistLion skipped a step
  (a non-finite gradient on any rank), so LR schedulers stay in step on all ranks, and
  under fp16 the GradScaler backs off on every rank, not only on the one that overflowed.

Under Accelerate's FSDP2 plugin (``fsdp_version: 2``) shard the model yourself over each
node's ranks before ``prepare``, as for plain FSDP2, and build DistLion with the mesh
(Accelerate's own hybrid sharding all-reduces across nodes before any optimizer sees a
gradient)::

    mesh = init_device_mesh("cuda", (M, G), mesh_dim_names=("replicate", "shard"))
    for module in [*model.blocks, model]: fully_shard(module, mesh=mesh["shard"])
    optimizer = DistLion(model.parameters(), lr=1e-4, device_mesh=mesh)
    model, optimizer, loader = distlion.accelerate.prepare(accelerator, model, optimizer, loader)

``save_state`` then writes DistLion's state with DCP (``distlion.dcp``) to
``distlion_optimizer{i}_dcp/``; Accelerate's own ``optimizer_{i}`` holds the
hyperparameters only.

Gradient clipping (``accelerator.clip_grad_norm_``) works on each rank's local
gradients: the norm is per rank, as is the clipping factor. Log the communication
figures with ``accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)``.
"""

import logging
import os
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from distlion import checkpoint
from distlion.local_shards import is_dtensor, is_sharded
from distlion.optim import DistLion
from distlion.wrappers import unwrap

logger = logging.getLogger(__name__)

_UNSUPPORTED_TYPES = ("MEGATRON_LM", "XLA")
DCP_DIRECTORY = "distlion_optimizer{index}_dcp"  # an FSDP2 job's DistLion state, in DCP's format
_FSDP2_RECIPE = ("shard the model over each node's ranks yourself before prepare and build DistLion with the mesh: "
                 "mesh = init_device_mesh(device, (M, G), mesh_dim_names=('replicate', 'shard')); fully_shard(module, "
                 "mesh=mesh['shard']) for each block and the model; DistLion(model.parameters(), ..., "
                 "device_mesh=mesh); launch with fsdp_version: 2 and fsdp_auto_wrap_policy: NO_WRAP")
# What load_state's errors tell the user to do (distlion.checkpoint.load_state fills in the saved world size).
_FIX = "relaunch with --num_processes {world_size}"
_MISSING = ("The directory was saved without distlion: resume from a directory saved by accelerator.save_state "
            "after distlion.accelerate.prepare, or load only the model weights and start DistLion fresh.")


def comm_metrics(optimizer: Any, prefix: str = "distlion/") -> dict[str, float]:
    """Return DistLion's communication figures, named for ``accelerator.log``.

    Example::

        accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)
    """
    inner = unwrap(optimizer)
    if inner is None:
        raise TypeError(f"comm_metrics needs a DistLion optimizer (or Accelerate's wrapper of one); "
                        f"got {type(optimizer).__name__}")
    return {f"{prefix}{key}": value for key, value in inner.comm_stats.as_dict().items()}


def prepare(accelerator: Any, *objects: Any, device_placement: list[bool] | None = None) -> Any:
    """Prepare ``objects`` like ``accelerator.prepare``; with DistLion, vote signs instead of all-reducing.

    Takes and returns what ``accelerator.prepare`` takes and returns, in the same order.

    Example::

        model, optimizer, loader = distlion.accelerate.prepare(accelerator, model, optimizer, loader)
    """
    if _kind(accelerator) == "DEEPSPEED":
        # The engine keeps gradients local and checkpoints every rank's state (distlion.deepspeed).
        import distlion.deepspeed  # noqa: F401  registers "DistLion" with deepspeed.initialize, which Accelerate calls
        return accelerator.prepare(*objects, device_placement=device_placement)
    new_distlions = [obj for obj in objects if unwrap(obj) is not None]
    adapter = _ADAPTERS.get(accelerator)
    if not new_distlions and adapter is None:
        return accelerator.prepare(*objects, device_placement=device_placement)
    for obj in new_distlions:
        _check_supported(accelerator, unwrap(obj))
    # Under FSDP2, Accelerate re-points the optimizers' parameters by storage address, which an empty
    # local shard (address 0) confuses; the model arrives sharded, so DistLion keeps its own.
    own_params = {id(opt): [list(group["params"]) for group in opt.param_groups]
                  for opt in map(unwrap, new_distlions)} if _is_fsdp(accelerator) else {}
    prepared = accelerator.prepare(*objects, device_placement=device_placement)
    for opt in map(unwrap, new_distlions):
        for group, params in zip(opt.param_groups, own_params.get(id(opt), [])):
            group["params"] = params
    results = prepared if len(objects) > 1 else (prepared,)
    if adapter is None:
        adapter = _ADAPTERS[accelerator] = _Adapter(accelerator)
    adapter.add(results)
    return prepared


# ------------------------------------------------------------------ internals

@dataclass
class _Entry:
    """One prepared DistLion: Accelerate's wrapper and the optimizer inside it."""

    wrapper: Any
    optimizer: DistLion
    loaded_by_hook: bool = False
    fsdp2: bool = False  # its state goes through DCP (distlion.dcp)


class _Adapter:
    """What ``prepare`` set up on one Accelerator: its DistLion optimizers and stopped models."""

    def __init__(self, accelerator: Any):
        # A weak reference: the accelerator holds this adapter through its hooks, and
        # _ADAPTERS must not keep the accelerator alive.
        self._accelerator = weakref.ref(accelerator)
        self.entries: list[_Entry] = []
        self.models: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()   # prepared through distlion
        self.stopped: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # DDP all-reduce replaced
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)
        self._wrap_get_state_dict()

    @property
    def accelerator(self) -> Any:
        return self._accelerator()

    def add(self, results: tuple) -> None:
        """Take over the prepared DistLion optimizers and stop DDP on the models that feed them."""
        entries_before = len(self.entries)
        for obj in results:
            if isinstance(obj, torch.nn.Module):
                self.models.add(obj)
            optimizer = unwrap(obj)
            if optimizer is not None and obj is not optimizer:
                self.entries.append(_Entry(obj, optimizer, fsdp2=_is_fsdp(self.accelerator)))
                self._wrap_step(self.entries[-1])
                self._wrap_load_state_dict(self.entries[-1])
                if self.entries[-1].fsdp2:
                    self._wrap_state_dict(self.entries[-1])
        owned = self._owned_parameters()
        for model in self.models:
            if isinstance(model, DistributedDataParallel) and model not in self.stopped \
                    and any(id(p) in owned for p in model.parameters()):
                self._stop_allreduce(model, owned)
        if len(self.entries) > entries_before and self.accelerator.num_processes > 1 and not self.stopped:
            logger.warning("DistLion was prepared without the DDP model that holds its parameters, so DDP still "
                           "all-reduces their gradients (correct, but no bandwidth saved). Pass the model to "
                           "distlion.accelerate.prepare too.")

    def _owned_parameters(self) -> set[int]:
        return {id(p) for entry in self.entries for group in entry.optimizer.param_groups for p in group["params"]}

    def _stop_allreduce(self, model: DistributedDataParallel, owned: set[int]) -> None:
        try:
            model.register_comm_hook(None, noop_hook)  # hands DDP back the local gradients
        except RuntimeError as error:  # DDP allows one comm hook per model
            raise RuntimeError("DistLion cannot stop DDP's gradient all-reduce: this model already has a comm hook "
                               f"({error}). Remove comm_hook from DistributedDataParallelKwargs; DistLion replaces "
                               "DDP's gradient communication.") from error
        self.stopped.add(model)
        foreign = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if foreign:
            logger.warning("DDP no longer all-reduces gradients of this model, but %d trainable parameter(s) are not "
                           "in a DistLion optimizer (e.g. %s): their gradients stay local to each rank.",
                           len(foreign), foreign[0])

    # Accelerate has no hooks for these three, so they wrap bound methods of this one
    # Accelerator / AcceleratedOptimizer instance (nothing class-wide): get_state_dict so
    # save_state and save_model write every weight; the optimizer's step to report
    # DistLion's agreed skip; its load to hand Accelerate's rank-0 optimizer.bin over to
    # the per-rank file the load hook has already loaded.

    def _wrap_get_state_dict(self) -> None:
        accelerated_get_state_dict = self.accelerator.get_state_dict

        def get_state_dict(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            state = accelerated_get_state_dict(model, *args, **kwargs)
            owned = self._owned_parameters()
            if state is not None and any(id(p) in owned for p in model.parameters()):
                _unalias(state)
            return state

        self.accelerator.get_state_dict = get_state_dict

    def _wrap_step(self, entry: _Entry) -> None:
        wrapper, optimizer, scaler = entry.wrapper, entry.optimizer, getattr(entry.wrapper, "scaler", None)
        accelerated_step = wrapper.step

        def step(_wrapper: Any, *args: Any, **kwargs: Any) -> Any:
            if not wrapper.gradient_state.sync_gradients:  # accumulating: Accelerate does not step
                return accelerated_step(*args, **kwargs)
            skipped_before = optimizer.comm_stats.skipped_steps
            scale_before = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
            result = accelerated_step(*args, **kwargs)
            skipped = optimizer.comm_stats.skipped_steps > skipped_before
            if skipped and scale_before:
                # GradScaler.update() saw only this rank's inf; back off as if every rank had one.
                scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 0,
                                        "scale": scale_before["scale"] * scaler.get_backoff_factor()})
            # GradScaler calls DistLion.step even on a skip, so Accelerate would report "not skipped".
            wrapper._is_overflow = skipped
            return result

        # A bound method, as torch's LR schedulers (built after prepare) re-wrap ``step.__func__``.
        wrapper.step = types.MethodType(step, wrapper)

    def _wrap_state_dict(self, entry: _Entry) -> None:
        """Under FSDP2, Accelerate saves ``optimizer.state_dict()`` with DCP, which keeps one copy of each
        shard's state for all replicas; DistLion's per-replica state goes to its own DCP directory, so
        Accelerate's gets the hyperparameters only."""
        accelerated_state_dict = entry.wrapper.state_dict

        def state_dict() -> dict:
            saved = accelerated_state_dict()
            groups = [{key: str(value) if isinstance(value, torch.dtype) else value for key, value in group.items()}
                      for group in saved["param_groups"]]  # DCP takes no dtype objects
            return {"state": {}, "param_groups": groups}

        entry.wrapper.state_dict = state_dict

    def _wrap_load_state_dict(self, entry: _Entry) -> None:
        accelerated_load = entry.wrapper.load_state_dict

        def load_state_dict(state_dict: dict) -> None:
            if entry.loaded_by_hook:
                entry.loaded_by_hook = False  # Accelerate's optimizer.bin is rank 0's: keep this rank's own
                return
            if entry.fsdp2 and not state_dict.get("state") and "distlion" not in state_dict:
                return  # Accelerate's FSDP2 optimizer_{i}: hyperparameters only; the load hook reads DistLion's DCP
            accelerated_load(state_dict)

        entry.wrapper.load_state_dict = load_state_dict

    # ------------------------------------------------------------ save / load

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Write this rank's DistLion state next to Accelerate's files (the hook runs on every rank)."""
        for index, entry in enumerate(self.entries):
            if entry.fsdp2:
                _dcp_save(entry.optimizer, os.path.join(output_dir, DCP_DIRECTORY.format(index=index)))
            else:
                checkpoint.save_state(entry.optimizer.state_dict(), output_dir, entry.optimizer, index)

    def _load_hook(self, models: list, input_dir: str) -> None:
        """Load this rank's own DistLion state; fail on every rank if any rank cannot."""
        def load() -> None:
            for index, entry in enumerate(self.entries):
                if entry.fsdp2:
                    _dcp_load(entry.optimizer, os.path.join(input_dir, DCP_DIRECTORY.format(index=index)))
                else:  # Accelerate loads optimizer.bin after this hook: the wrapper then keeps this state
                    entry.optimizer.load_state_dict(
                        checkpoint.load_state(input_dir, entry.optimizer, index, fix=_FIX, missing=_MISSING))
                    entry.loaded_by_hook = True

        try:
            checkpoint.fail_together(load, source=input_dir)
        except Exception:
            for entry in self.entries:
                entry.loaded_by_hook = False
            raise
        # Accelerate loads the weights next, with safetensors, which refuses a parameter that is
        # a view of a larger storage (DistLion's bucket, once it has stepped). Give each one its
        # own storage: DistLion lays the loaded weights and state out again at its next step().
        owned = self._owned_parameters()
        for model in models:
            for param in model.parameters():
                if id(param) in owned and not is_dtensor(param) and param.untyped_storage().nbytes() != param.numel() * param.element_size():
                    param.data = param.data.clone()


_ADAPTERS: "weakref.WeakKeyDictionary[Any, _Adapter]" = weakref.WeakKeyDictionary()


def _is_fsdp(accelerator: Any) -> bool:
    return str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type)) == "FSDP"


def _dcp_save(optimizer: DistLion, directory: str) -> None:
    import torch.distributed.checkpoint as dcp

    from distlion.dcp import sharded_state

    dcp.save({"optimizer": sharded_state(optimizer)}, checkpoint_id=directory)


def _dcp_load(optimizer: DistLion, directory: str) -> None:
    import torch.distributed.checkpoint as dcp

    from distlion.dcp import sharded_state

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist: " + _MISSING)
    dcp.load({"optimizer": sharded_state(optimizer)}, checkpoint_id=directory)


def _kind(accelerator: Any) -> str:
    return str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))


def _check_supported(accelerator: Any, optimizer: DistLion) -> None:
    kind = _kind(accelerator)
    if kind in _UNSUPPORTED_TYPES:
        raise ValueError(f"distlion.accelerate.prepare supports data parallelism (DDP), FSDP2 and DeepSpeed (ZeRO "
                         f"stage 0-2); this Accelerator uses {kind}. Use DistLion with one of those.")
    if kind == "FSDP":
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError("distlion.accelerate.prepare supports Accelerate's FSDP2 (fsdp_version: 2), not FSDP1: "
                             + _FSDP2_RECIPE)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if optimizer.device_mesh is None or not all(is_sharded(p) for p in params):
            raise ValueError("DistLion under Accelerate's FSDP2 plugin: " + _FSDP2_RECIPE + ". Accelerate's own "
                             "sharding (and its hybrid sharding) all-reduces the gradients across nodes before "
                             "DistLion sees them.")
    if accelerator.num_processes > 1 and optimizer.world_size == 1:
        raise ValueError(f"DistLion was built with world size 1 but this job has {accelerator.num_processes} "
                         f"processes: it was created before torch.distributed was initialised. Create the "
                         f"Accelerator first, then the optimizer.")
    ddp_handler = getattr(accelerator, "ddp_handler", None)
    hook = getattr(ddp_handler, "comm_hook", None)
    if hook is not None and str(getattr(hook, "value", hook)) != "no":
        raise ValueError(f"DistributedDataParallelKwargs(comm_hook={hook}) conflicts with DistLion, which replaces "
                         f"DDP's gradient communication: remove the comm_hook.")


def _unalias(state: dict) -> None:
    """Give every tensor that shares storage with another its own copy.

    DistLion's parameters are views of one flat bucket. Accelerate's safetensors writer
    keeps one tensor per storage (it takes the others for tied weights) and would drop the
    rest of the model; copies on the CPU keep every weight and spare accelerator memory.
    """
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and not is_dtensor(tensor):  # FSDP2's shards are FSDP's own
            by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    for names in by_storage.values():
        if len(names) > 1:
            for name in names:
                state[name] = state[name].detach().to("cpu", copy=True)
