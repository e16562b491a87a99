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
- ``accelerator.save_state(dir)`` also writes ``distlion_optimizer_rank{r}.bin`` from
  every rank (Accelerate writes ``optimizer.bin`` from the main process only, and momentum
  differs on every rank), and ``accelerator.load_state(dir)`` gives each rank back its
  own file. A directory saved without DistLion, or by another number of processes,
  fails on every rank with an error that says what was found and what was expected.
- ``save_state`` and ``save_model`` write every weight: parameters are views of DistLion's
  flat buckets, which Accelerate's safetensors writer would take for tied weights and drop,
  so ``accelerator.get_state_dict`` returns CPU copies of them.
- ``optimizer.step_was_skipped`` is True on every rank when DistLion skipped a step
  (a non-finite gradient on any rank), so LR schedulers stay in step on all ranks, and
  under fp16 the GradScaler backs off on every rank, not only on the one that overflowed.

Gradient clipping (``accelerator.clip_grad_norm_``) works on each rank's local
gradients: the norm is per rank, as is the clipping factor. Log the communication
figures with ``accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)``.
"""

import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distlion.optim import DistLion

logger = logging.getLogger(__name__)

STATE_FILE_PATTERN = re.compile(r"^distlion_optimizer(?:_(\d+))?_rank(\d+)\.bin$")
_UNSUPPORTED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


def state_file_name(optimizer_index: int, rank: int) -> str:
    """Return the file one rank's DistLion state is saved in (``optimizer.bin`` naming)."""
    suffix = f"_{optimizer_index}" if optimizer_index > 0 else ""
    return f"distlion_optimizer{suffix}_rank{rank}.bin"


# No ``from __future__ import annotations`` here: DDP checks this hook's annotations at runtime.
def local_gradients_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Hand DDP back this rank's gradients unchanged, so no all-reduce happens.

    Register it with ``ddp_model.register_comm_hook(None, local_gradients_hook)``.
    """
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def comm_metrics(optimizer: Any, prefix: str = "distlion/") -> dict[str, float]:
    """Return DistLion's communication figures, named for ``accelerator.log``.

    Example::

        accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)
    """
    inner = _unwrap_distlion(optimizer)
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
    new_distlions = [obj for obj in objects if _unwrap_distlion(obj) is not None]
    adapter = _ADAPTERS.get(accelerator)
    if not new_distlions and adapter is None:
        return accelerator.prepare(*objects, device_placement=device_placement)
    for obj in new_distlions:
        _check_supported(accelerator, _unwrap_distlion(obj))
    prepared = accelerator.prepare(*objects, device_placement=device_placement)
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
            optimizer = _unwrap_distlion(obj)
            if optimizer is not None and obj is not optimizer:
                self.entries.append(_Entry(obj, optimizer))
                self._wrap_step(self.entries[-1])
                self._wrap_load_state_dict(self.entries[-1])
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
            model.register_comm_hook(None, local_gradients_hook)
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

        def step(*args: Any, **kwargs: Any) -> Any:
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

        wrapper.step = step

    def _wrap_load_state_dict(self, entry: _Entry) -> None:
        accelerated_load = entry.wrapper.load_state_dict

        def load_state_dict(state_dict: dict) -> None:
            if entry.loaded_by_hook:
                entry.loaded_by_hook = False  # Accelerate's optimizer.bin is rank 0's: keep this rank's own
                return
            accelerated_load(state_dict)

        entry.wrapper.load_state_dict = load_state_dict

    # ------------------------------------------------------------ save / load

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Write this rank's DistLion state next to Accelerate's files (the hook runs on every rank)."""
        rank = self.accelerator.process_index
        for index, entry in enumerate(self.entries):
            torch.save(entry.optimizer.state_dict(), os.path.join(output_dir, state_file_name(index, rank)))

    def _load_hook(self, models: list, input_dir: str) -> None:
        """Load this rank's own DistLion state; fail on every rank if any rank cannot."""
        error: Exception | None = None
        try:
            for index, entry in enumerate(self.entries):
                entry.optimizer.load_state_dict(self._read_state(input_dir, index))
                entry.loaded_by_hook = True
        except Exception as caught:  # any failure must reach the other ranks before anyone raises
            error = caught
        failed = self.accelerator.gather(torch.tensor([int(error is not None)], device=self.accelerator.device))
        failed_ranks = [rank for rank, flag in enumerate(failed.tolist()) if flag]
        if not failed_ranks:
            return
        for entry in self.entries:
            entry.loaded_by_hook = False
        if error is not None:
            raise error
        raise RuntimeError(f"DistLion: rank(s) {failed_ranks} could not load their optimizer state from "
                           f"{input_dir} (see their error); this rank stops too instead of waiting for them.")

    def _read_state(self, input_dir: str, index: int) -> dict:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        path = os.path.join(input_dir, state_file_name(index, rank))
        saved_ranks = sorted(int(m.group(2)) for m in map(STATE_FILE_PATTERN.match, os.listdir(input_dir))
                             if m and int(m.group(1) or 0) == index)
        if not os.path.exists(path):
            if not saved_ranks:
                raise ValueError(
                    f"{input_dir} holds no DistLion optimizer state: expected {state_file_name(index, rank)} (one "
                    f"file per rank, written by accelerator.save_state after distlion.accelerate.prepare), found "
                    f"{sorted(os.listdir(input_dir))}. The directory was saved without distlion; resume from a "
                    f"directory saved with it, or load only the model weights and start DistLion fresh.")
            raise ValueError(
                f"{input_dir} holds DistLion optimizer state of {len(saved_ranks)} rank(s) (ranks {saved_ranks}), "
                f"but this run has {world} processes and rank {rank} has no {state_file_name(index, rank)}. "
                f"Momentum is per rank and cannot be re-split: relaunch with --num_processes {len(saved_ranks)}.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_world = state.get("distlion", {}).get("world_size")
        expected_world = self.entries[index].optimizer.world_size
        if saved_world is not None and saved_world != expected_world:
            raise ValueError(
                f"{path} was saved by a run of world size {saved_world}, but this run has world size "
                f"{expected_world} ({world} processes). Momentum is per rank and cannot be re-split: "
                f"relaunch with --num_processes {saved_world}.")
        return state


_ADAPTERS: "weakref.WeakKeyDictionary[Any, _Adapter]" = weakref.WeakKeyDictionary()


def _unwrap_distlion(obj: Any) -> DistLion | None:
    """Return the DistLion inside Accelerate's optimizer wrappers, or None."""
    for _ in range(4):  # AcceleratedOptimizer nests at most a couple of levels
        if isinstance(obj, DistLion):
            return obj
        if not isinstance(obj, torch.optim.Optimizer):
            return None
        obj = getattr(obj, "optimizer", None)
    return None


def _check_supported(accelerator: Any, optimizer: DistLion) -> None:
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in _UNSUPPORTED_TYPES:
        raise ValueError(f"distlion.accelerate.prepare supports data parallelism (DDP); this Accelerator uses "
                         f"{kind}. Use DistLion with plain DDP, or distlion.deepspeed for DeepSpeed ZeRO stage 0.")
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
        if isinstance(tensor, torch.Tensor):
            by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    for names in by_storage.values():
        if len(names) > 1:
            for name in names:
                state[name] = state[name].detach().to("cpu", copy=True)
