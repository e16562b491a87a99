"""Hugging Face Accelerate: DistLion in ``accelerate launch`` jobs.

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
  from every rank (Accelerate writes ``optimizer.bin`` from the main process only, and
  momentum differs on every rank), and ``accelerator.load_state(dir)`` gives each rank
  back its own file (Accelerate's own copy is not loaded into DistLion). A directory saved
  without DistLion, or by another number of processes, fails on every rank with an error
  that says what was found and what was expected.
- ``save_state`` and ``save_model`` write every weight: parameters are views of DistLion's
  flat buckets, which Accelerate's safetensors writer would take for tied weights and drop,
  so ``accelerator.get_state_dict`` returns CPU copies of them.
- ``optimizer.step_was_skipped`` is True on every rank when DistLion skipped a step
  (a non-finite gradient on any rank), so LR schedulers stay in step on all ranks, and
  under fp16 the GradScaler backs off on every rank, not only on the one that overflowed.

Under Accelerate's FSDP2 plugin (``fsdp_version: 2``) shard the model yourself over each
node's ranks before ``prepare``, as for plain FSDP2, and vote across the nodes (Accelerate's
own hybrid sharding all-reduces across nodes before any optimizer sees a gradient). The
mesh is yours, or the one Accelerate builds from its ``ParallelismConfig``::

    accelerator = Accelerator(parallelism_config=ParallelismConfig(dp_replicate_size=M, dp_shard_size=G))
    mesh = accelerator.torch_device_mesh                  # dims ("dp_replicate", "dp_shard")
    for module in [*model.blocks, model]: fully_shard(module, mesh=mesh["dp_shard"])
    optimizer = DistLion(model.parameters(), lr=1e-4, device_mesh=mesh)
    model, optimizer, loader = distlion.accelerate.prepare(accelerator, model, optimizer, loader)

Your own mesh works alike (``init_device_mesh(device, (M, G), mesh_dim_names=("replicate",
"shard"))``, ``mesh["shard"]``), and so does ``process_group=mesh.get_group("dp_replicate")``
instead of ``device_mesh=mesh``. ``save_state`` then writes DistLion's state with DCP
(``distlion.dcp``) to ``distlion_optimizer{i}_dcp/``; Accelerate's own ``optimizer_{i}``
holds the hyperparameters only.

Gradient clipping (``accelerator.clip_grad_norm_``) works on each rank's local
gradients: the norm is per rank, as is the clipping factor. Log the communication
figures with ``accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)``.
"""

from __future__ import annotations

import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from distlion.integrations import activate
from distlion.integrations.common import (DCP_DIRECTORY, ShardedState, UnsupportedSetupError,
                                          check_built_distributed, comm_metrics, fail_together,
                                          keep_gradients_local, load_sharded, load_state, owned_parameters,
                                          report_agreed_skips, save_sharded, save_state, shortest_timeout, unwrap)
from distlion.local_shards import is_dtensor, is_sharded
from distlion.optim import DistLion

__all__ = ["comm_metrics", "prepare"]

logger = logging.getLogger("distlion.accelerate")  # the name users configure logging by

_UNSUPPORTED_TYPES = ("MEGATRON_LM", "XLA")
_FSDP2_RECIPE = ("shard the model over each node's ranks yourself before prepare and vote across the nodes: "
                 "mesh = accelerator.torch_device_mesh (Accelerator(parallelism_config=ParallelismConfig("
                 "dp_replicate_size=M, dp_shard_size=G))) or init_device_mesh(device, (M, G), mesh_dim_names="
                 "('replicate', 'shard')); fully_shard(module, mesh=mesh['dp_shard'] or mesh['shard']) for each block "
                 "and the model; DistLion(model.parameters(), ..., device_mesh=mesh); launch with fsdp_version: 2 "
                 "and fsdp_auto_wrap_policy: NO_WRAP")
# What load_state's errors tell the user to do (common.load_state fills in the saved world size).
_FIX = "relaunch with --num_processes {world_size}"
_MISSING = ("The directory was saved without distlion: resume from a directory saved by accelerator.save_state "
            "after distlion.accelerate.prepare, or load only the model weights and start DistLion fresh.")


def prepare(accelerator: Any, *objects: Any, device_placement: list[bool] | None = None) -> Any:
    """Prepare ``objects`` like ``accelerator.prepare``; with DistLion, vote signs instead of all-reducing.

    Takes and returns what ``accelerator.prepare`` takes and returns, in the same order.

    Example::

        model, optimizer, loader = distlion.accelerate.prepare(accelerator, model, optimizer, loader)
    """
    if _kind(accelerator) == "DEEPSPEED":
        # The engine keeps gradients local and checkpoints every rank's state (distlion.deepspeed).
        activate("deepspeed")  # registers "DistLion" with deepspeed.initialize, which Accelerate calls
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
                  for opt in map(unwrap, new_distlions)} if _kind(accelerator) == "FSDP" else {}
    prepared = accelerator.prepare(*objects, device_placement=device_placement)
    for opt in map(unwrap, new_distlions):
        for group, params in zip(opt.param_groups, own_params.get(id(opt), [])):
            group["params"] = params
    if adapter is None:
        adapter = _ADAPTERS[accelerator] = _Adapter(accelerator)
    adapter.add(prepared if len(objects) > 1 else (prepared,))
    return prepared


# ------------------------------------------------------------------ internals

@dataclass
class _Entry:
    """One prepared DistLion, and how its state is kept."""

    optimizer: DistLion
    state_mesh: Any = None  # under FSDP2: the (replicate, shard) mesh its DCP state is stacked over


class _Adapter:
    """What ``prepare`` set up on one Accelerator: its DistLion optimizers and the models that feed them."""

    def __init__(self, accelerator: Any):
        # A weak reference: the accelerator holds this adapter through its hooks, and
        # _ADAPTERS must not keep the accelerator alive.
        self._accelerator = weakref.ref(accelerator)
        self.entries: list[_Entry] = []
        self.models: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # prepared through distlion
        self.local: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()   # DDP all-reduce replaced
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        self._wrap_accelerator()

    @property
    def accelerator(self) -> Any:
        return self._accelerator()

    def add(self, results: tuple) -> None:
        """Take over the prepared DistLion optimizers and stop DDP on the models that feed them."""
        fsdp = _kind(self.accelerator) == "FSDP"
        added = False
        for obj in results:
            if isinstance(obj, torch.nn.Module):
                self.models.add(obj)
            optimizer = unwrap(obj)
            if optimizer is not None and obj is not optimizer:
                self.entries.append(_Entry(optimizer, _state_mesh(self.accelerator, optimizer) if fsdp else None))
                report_agreed_skips(obj)
                added = True
        owned = owned_parameters(entry.optimizer for entry in self.entries)
        for model in self.models:
            if isinstance(model, DistributedDataParallel) and any(id(p) in owned for p in model.parameters()):
                keep_gradients_local(model, owned)
                self.local.add(model)
        if added and not fsdp and self.accelerator.num_processes > 1 and not self.local:
            logger.warning("DistLion was prepared without the DDP model that holds its parameters, so DDP still "
                           "all-reduces their gradients (correct, but no bandwidth saved). Pass the model to "
                           "distlion.accelerate.prepare too.")

    # Accelerate has no hooks for these, so they wrap bound methods of this one Accelerator
    # instance (nothing class-wide): get_state_dict, so that save_state and save_model write
    # every weight; save_state and load_state, so that Accelerate's own copy of DistLion's
    # state (rank 0's optimizer.bin; under FSDP2 its optimizer_{i}) neither replaces each
    # rank's own on load nor, under FSDP2, holds more than the hyperparameters.

    def _wrap_accelerator(self) -> None:
        accelerator = self.accelerator
        accelerated_get_state_dict = accelerator.get_state_dict
        accelerated_save_state, accelerated_load_state = accelerator.save_state, accelerator.load_state

        def get_state_dict(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            state = accelerated_get_state_dict(model, *args, **kwargs)
            owned = owned_parameters(entry.optimizer for entry in self.entries)
            if state is not None and any(id(p) in owned for p in model.parameters()):
                _unalias(state)
            return state

        def save_state(*args: Any, **kwargs: Any) -> Any:
            with self._state_kept_from_accelerate():
                return accelerated_save_state(*args, **kwargs)

        def load_state(*args: Any, **kwargs: Any) -> Any:
            with self._state_kept_from_accelerate():
                return accelerated_load_state(*args, **kwargs)

        accelerator.get_state_dict, accelerator.save_state, accelerator.load_state = \
            get_state_dict, save_state, load_state

    @contextmanager
    def _state_kept_from_accelerate(self) -> Iterator[None]:
        """While Accelerate saves or loads its files, DistLion's state is the hooks' alone.

        Accelerate loads its own copy into each optimizer (rank 0's ``optimizer.bin``; under
        FSDP2, through ``set_optimizer_state_dict`` on the DistLion itself): those loads are
        ignored, as the load hook gives every rank its own state. Under FSDP2, Accelerate's
        ``get_optimizer_state_dict`` gets the hyperparameters only (DCP would keep one copy of
        each rank's momentum for every rank); the momentum goes to ``distlion_optimizer{i}_dcp``.
        """
        for entry in self.entries:
            optimizer = entry.optimizer
            optimizer.load_state_dict = _ignore_accelerates_copy
            if entry.state_mesh is not None:
                optimizer.state_dict = lambda optimizer=optimizer: _hyperparameters(optimizer)
        try:
            yield
        finally:
            for entry in self.entries:
                for name in ("load_state_dict", "state_dict"):
                    vars(entry.optimizer).pop(name, None)

    # ------------------------------------------------------------ save / load

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Write this rank's DistLion state next to Accelerate's files (the hook runs on every rank)."""
        for index, entry in enumerate(self.entries):
            if entry.state_mesh is not None:
                save_sharded(entry.optimizer, os.path.join(output_dir, DCP_DIRECTORY.format(index=index)),
                             entry.state_mesh)
            else:
                save_state(entry.optimizer.state_dict(), output_dir, entry.optimizer, index)

    def _load_hook(self, models: list, input_dir: str) -> None:
        """Load this rank's own DistLion state; fail on every rank if any rank cannot."""
        def load() -> None:
            for index, entry in enumerate(self.entries):
                if entry.state_mesh is not None:
                    load_sharded(entry.optimizer, os.path.join(input_dir, DCP_DIRECTORY.format(index=index)),
                                 entry.state_mesh, missing=_MISSING)
                else:  # the class's load: the instance's ignores Accelerate's optimizer.bin, loaded after this
                    state = load_state(input_dir, entry.optimizer, index, fix=_FIX, missing=_MISSING)
                    type(entry.optimizer).load_state_dict(entry.optimizer, state)

        fail_together(load, source=input_dir, timeout=shortest_timeout(entry.optimizer for entry in self.entries))
        # Accelerate loads the weights next, with safetensors, which refuses a parameter that is
        # a view of a larger storage (DistLion's bucket, once it has stepped). Give each one its
        # own storage: DistLion lays the loaded weights and state out again at its next step().
        owned = owned_parameters(entry.optimizer for entry in self.entries)
        for model in models:
            for param in model.parameters():
                if id(param) in owned and not is_dtensor(param) and \
                        param.untyped_storage().nbytes() != param.numel() * param.element_size():
                    param.data = param.data.clone()


_ADAPTERS: "weakref.WeakKeyDictionary[Any, _Adapter]" = weakref.WeakKeyDictionary()


def _ignore_accelerates_copy(state_dict: dict) -> None:
    """DistLion's ``load_state_dict`` while Accelerate loads its files: the load hook loads each rank's own."""


def _hyperparameters(optimizer: DistLion) -> dict:
    """``optimizer.state_dict()`` without the state: what Accelerate's FSDP2 ``optimizer_{i}`` keeps."""
    return {"state": {}, "param_groups": type(optimizer).state_dict(optimizer)["param_groups"]}


def _state_mesh(accelerator: Any, optimizer: DistLion) -> Any:
    """The (replicate, shard) mesh DistLion's DCP state is stacked over: its own, else Accelerate's (or None)."""
    return optimizer.device_mesh or getattr(accelerator, "torch_device_mesh", None)


def _kind(accelerator: Any) -> str:
    return str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))


def _check_supported(accelerator: Any, optimizer: DistLion) -> None:
    kind = _kind(accelerator)
    if kind in _UNSUPPORTED_TYPES:
        raise UnsupportedSetupError(f"distlion.accelerate.prepare supports data parallelism (DDP), FSDP2 and "
                                    f"DeepSpeed (ZeRO stage 0-2); this Accelerator uses {kind}. Use DistLion with "
                                    f"one of those.")
    if kind == "FSDP":
        if not getattr(accelerator, "is_fsdp2", False):
            raise UnsupportedSetupError("distlion.accelerate.prepare supports Accelerate's FSDP2 (fsdp_version: 2), "
                                        "not FSDP1: " + _FSDP2_RECIPE)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not all(is_sharded(p) for p in params):
            raise UnsupportedSetupError("DistLion under Accelerate's FSDP2 plugin: " + _FSDP2_RECIPE + ". Accelerate's "
                                        "own sharding (and its hybrid sharding) all-reduces the gradients across "
                                        "nodes before DistLion sees them.")
        # DistLion checked at construction that its vote group holds one rank of each shard group; its
        # DCP state is stacked over a (replicate, shard) mesh: its own, or the one Accelerate built.
        mesh = _state_mesh(accelerator, optimizer)
        if mesh is None:
            raise UnsupportedSetupError("DistLion under Accelerate's FSDP2 plugin votes over process_group, but "
                                        "save_state needs the (replicate, shard) mesh to write its state: build "
                                        "DistLion with device_mesh=mesh instead of process_group=mesh.get_group("
                                        "'replicate'), or let Accelerate build the mesh (ParallelismConfig).")
        ShardedState(optimizer, mesh)  # raises now, on every rank, if the mesh does not fit the shards
    check_built_distributed(optimizer, accelerator.num_processes, "Create the Accelerator first, then the optimizer.")
    ddp_handler = getattr(accelerator, "ddp_handler", None)
    hook = getattr(ddp_handler, "comm_hook", None)
    if hook is not None and str(getattr(hook, "value", hook)) != "no":
        raise UnsupportedSetupError(f"DistributedDataParallelKwargs(comm_hook={hook}) conflicts with DistLion, which "
                                    f"replaces DDP's gradient communication: remove the comm_hook.")


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
