"""What every integration shares, written once.

The integrations (``accelerate``, ``deepspeed``, ``transformers``, ``lightning``, ``dcp``,
``torchrun``) are siblings over this module: each imports it, none imports another. It holds

- finding the DistLion inside a wrapper (``unwrap``, or ``distlion_of``, which raises);
- keeping gradients local under DDP (``keep_gradients_local``: a comm hook that hands DDP
  back each rank's own gradients), and making Accelerate's optimizer wrapper report
  DistLion's agreed skips (``report_agreed_skips``);
- a GradScaler that backs off on every rank after a skip all ranks agreed on
  (``step_with_agreed_skip``);
- refusing an optimizer built before torch.distributed started (``check_built_distributed``);
- the communication figures a training log gets (``comm_metrics``);
- where an FSDP2 job's DCP state goes (``DCP_DIRECTORY``);
- the state of a DistLion over FSDP2 shards in DCP's format (``ShardedState``), which
  ``distlion.dcp`` offers and Accelerate's FSDP2 ``save_state`` writes;
- ``fail_together``: a failure on one rank raised on every rank, each wait bounded by the
  optimizer's ``timeout``.

Failures, one type per kind:

- ``NotDistLionError`` (a ``TypeError``): the object is neither a DistLion nor a wrapper of one;
- ``UnsupportedSetupError`` (a ``ValueError``): a setup DistLion cannot run in, raised on
  every rank before any collective, naming the setting and what works instead;
- ``ValueError``: a checkpoint that does not fit this run (missing, unreadable, foreign,
  another topology), naming the file, what was found and the fix;
- ``RuntimeError``: another rank failed (``fail_together``); this one stops instead of waiting;
- ``CollectiveError``: a rank did not answer within ``DistLion(timeout=...)``.

Per-rank files, their manifest, and resuming on another topology are ``distlion.checkpoint``'s
(``save_state`` and ``load_state`` are re-exported here for the integrations): every rank
writes ``distlion_optimizer{index}_rank{rank}_of_{world_size}.{save}.pt`` crash-safely, rank
0 seals the save with ``distlion_optimizer{index}_manifest.json``, and a load reads the
manifest first. Files are read with ``torch.load(weights_only=True)`` (``load_file``):
tensors and plain Python values only, so a crafted file cannot run code.
"""

from __future__ import annotations

import logging
import math
import os
import types
import weakref
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

from distlion.checkpoint.files import STATE_FILE, StateFile, find_state_files, state_file_name
from distlion.checkpoint.resume import (TOPOLOGY_FIELDS, describe_mismatch, load_file, load_state, save_state,
                                        topology)
from distlion.comm import CommStats
from distlion.comm.flat import CollectiveError, flag_device, wait_for
from distlion.local_shards import REPLICATE_DIMS, is_sharded
from distlion.optim import DistLion
from distlion.state_checks import check_finite, check_saved_group
from distlion.vote import VOTES

__all__ = ["CollectiveError", "DCP_DIRECTORY", "LOGGED_STATS", "NotDistLionError", "STATE_FILE", "ShardedState",
           "StateFile", "UnsupportedSetupError", "check_built_distributed", "comm_metrics", "describe_mismatch",
           "distlion_of", "fail_together", "find_state_files", "keep_gradients_local", "load_file", "load_sharded",
           "load_state", "needs", "owned_parameters", "report_agreed_skips", "save_sharded", "save_state",
           "shortest_timeout", "state_file_name", "step_with_agreed_skip", "topology", "unwrap"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class NotDistLionError(TypeError):
    """The object is neither a DistLion nor a wrapper of one."""


class UnsupportedSetupError(ValueError):
    """A setup DistLion cannot run in; raised on every rank before any collective."""


@contextmanager
def needs(package: str, extra: str) -> Iterator[None]:
    """Turn an ImportError inside the block into one that names ``package`` and the extra that installs it.

    Example::

        with needs("Hugging Face transformers", "transformers"):
            from transformers import Trainer
    """
    try:
        yield
    except ImportError as error:
        raise ImportError(f"distlion.{extra} needs {package}: pip install 'distlion[{extra}]'") from error


# ------------------------------------------------------------------ unwrap

def unwrap(obj: Any) -> DistLion | None:
    """Return the DistLion that ``obj`` is or wraps, or None when there is none.

    Looks through optimizer wrappers (objects with ``param_groups`` that keep the inner
    optimizer as ``.optimizer``: Accelerate's ``AcceleratedOptimizer``, DeepSpeed's
    ``FP16_UnfusedOptimizer`` and ``BF16_Optimizer``), DeepSpeed engines (the client
    optimizer is ``engine.basic_optimizer``) and Lightning's ``LightningOptimizer`` (it
    keeps the optimizer as ``._optimizer`` and subclasses its class over a copy of its
    ``__dict__``, so it is followed, not taken for the DistLion). A model or an LR scheduler
    is not a wrapper: a scheduler's ``.optimizer`` is not followed.

    Example::

        engine, optimizer, _, _ = distlion.deepspeed.initialize(...)
        distlion.unwrap(engine).comm_stats.bytes_sent
    """
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        inner = vars(obj).get("_optimizer") if hasattr(obj, "__dict__") else None  # a LightningOptimizer
        if inner is None:
            if isinstance(obj, DistLion):
                return obj
            inner = getattr(obj, "basic_optimizer", None)  # a DeepSpeed engine
            if inner is None and hasattr(obj, "param_groups"):  # an optimizer wrapper
                inner = getattr(obj, "optimizer", None)
        obj = inner
    return None


def distlion_of(obj: Any, user: str, fix: str = "") -> DistLion:
    """Return ``unwrap(obj)``; raise ``NotDistLionError`` naming ``user``, what it got and ``fix`` if there is none."""
    optimizer = unwrap(obj)
    if optimizer is None:
        raise NotDistLionError(f"{user} needs a DistLion optimizer (or a wrapper of one); got {type(obj).__name__}"
                               + (f": {fix}" if fix else ""))
    return optimizer


def owned_parameters(optimizers: Iterable[DistLion]) -> set[int]:
    """The ids of every parameter in ``optimizers``' param groups."""
    return {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}


# ------------------------------------------------------------------ local gradients, agreed skips

_KEPT_LOCAL: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # DDP models with DistLion's hook


def keep_gradients_local(model: torch.nn.parallel.DistributedDataParallel, owned: set[int]) -> None:
    """Stop DDP's gradient all-reduce on ``model``: each rank keeps its own gradients, DistLion votes on them.

    The comm hook (torch's ``noop_hook``) hands DDP back the local bucket unchanged; a
    model that has it already is left alone. ``owned``: the ids of DistLion's parameters
    (``owned_parameters``); any other trainable parameter now trains on local gradients,
    which is logged.
    """
    if model in _KEPT_LOCAL:
        return
    try:
        model.register_comm_hook(None, noop_hook)
    except RuntimeError as error:  # DDP allows one comm hook per model
        raise UnsupportedSetupError(
            f"DistLion cannot stop DDP's gradient all-reduce: this model already has a comm hook ({error}). Remove "
            "it (DistributedDataParallelKwargs(comm_hook=...), DDPStrategy(ddp_comm_hook=...)): DistLion replaces "
            "DDP's gradient communication.") from error
    _KEPT_LOCAL.add(model)
    foreign = [name for name, p in model.module.named_parameters() if p.requires_grad and id(p) not in owned]
    if foreign:
        logger.warning("DDP no longer all-reduces gradients of this model, but %d trainable parameter(s) are not in "
                       "a DistLion optimizer (e.g. %s): their gradients stay local to each rank.", len(foreign),
                       foreign[0])


def step_with_agreed_skip(optimizer: DistLion, scaler: Any, step: Callable[[], T]) -> tuple[T, bool]:
    """Run ``step()`` (which steps ``optimizer``, through ``scaler`` or not); return its result and whether
    DistLion skipped it.

    DistLion skips a step on every rank when any rank's gradient is non-finite, but
    ``GradScaler.update()`` sees this rank's infs only: after a skip, the scale is set to
    what it was times the back-off factor on every rank, so the scales stay equal.
    """
    skipped_before = optimizer.comm_stats.skipped_steps
    scale_before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    result = step()
    skipped = optimizer.comm_stats.skipped_steps > skipped_before
    if skipped and scale_before is not None:
        scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 0,
                                "scale": scale_before * scaler.get_backoff_factor()})
    return result, skipped


def report_agreed_skips(wrapper: Any) -> None:
    """Make Accelerate's ``AcceleratedOptimizer`` ``wrapper`` report DistLion's agreed skips.

    GradScaler calls ``DistLion.step`` even on a skip, so Accelerate would report "not
    skipped" (``step_was_skipped``, which LR schedulers and Trainer read); after the step
    it is True on every rank exactly when DistLion skipped, and the scaler backs off on
    every rank (``step_with_agreed_skip``). Only this instance's ``step`` is replaced.
    """
    optimizer, scaler, accelerated_step = unwrap(wrapper), getattr(wrapper, "scaler", None), wrapper.step

    def step(_wrapper: Any, *args: Any, **kwargs: Any) -> Any:
        if not wrapper.gradient_state.sync_gradients:  # accumulating: Accelerate does not step
            return accelerated_step(*args, **kwargs)
        result, wrapper._is_overflow = step_with_agreed_skip(optimizer, scaler,
                                                             lambda: accelerated_step(*args, **kwargs))
        return result

    # A bound method, as torch's LR schedulers (built after prepare) re-wrap ``step.__func__``.
    wrapper.step = types.MethodType(step, wrapper)


def check_built_distributed(optimizer: DistLion, processes: int, fix: str) -> None:
    """Raise ``UnsupportedSetupError`` if ``optimizer`` was built before torch.distributed started in a job of
    ``processes`` processes (it would train alone on every rank); ``fix`` says what to create first."""
    if processes > 1 and optimizer.process_group is None:
        raise UnsupportedSetupError(f"DistLion was built with world size 1 but this job has {processes} processes: "
                                    f"it was created before torch.distributed was initialised. {fix}")


# ------------------------------------------------------------------ logged figures

# comm_stats fields a training log gets, as "distlion/<field>".
LOGGED_STATS = CommStats.LOGGED


def comm_metrics(optimizer: Any, prefix: str = "distlion/") -> dict[str, float]:
    """Return DistLion's communication figures for a training log: ``LOGGED_STATS``, named ``prefix + field``.

    ``optimizer`` is a DistLion or any wrapper of one (``unwrap``).

    Example::

        accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)
    """
    return distlion_of(optimizer, "comm_metrics").comm_stats.logged(prefix)


# ------------------------------------------------------------------ per-rank state files

DCP_DIRECTORY = "distlion_optimizer{index}_dcp"  # an FSDP2 job's DistLion state, in DCP's format (distlion.dcp)


# ------------------------------------------------------------------ sharded state (DCP)

FORMAT = 1
META_FIELDS = ("format", "replicas", "vote", "step", "parameters")
GROUP_FIELDS = ("lr", "beta1", "beta2", "weight_decay", "vote_ema_beta")  # vote_ema_beta None is saved as nan


class ShardedState:
    """A DistLion over FSDP2-sharded parameters, as ``torch.distributed.checkpoint.stateful.Stateful``.

    Each state tensor of a parameter of shape ``S`` is one DTensor of shape ``(M, *S)`` over
    the (replicate, shard) ``mesh``, placements ``(Shard(0), Shard(d + 1))`` where FSDP shards
    dim ``d``: replica m's momentum is row m (``distlion.dcp`` explains the format).
    ``mesh``: the optimizer's ``device_mesh`` by default; one whose first dim is the
    optimizer's vote group otherwise (Accelerate's, for a DistLion built with
    ``process_group=mesh.get_group("dp_replicate")``).
    """

    def __init__(self, optimizer: Any, mesh: Any = None, checkpoint_id: Any = None, strict: bool | None = None):
        inner = distlion_of(optimizer, "sharded_state")
        self.optimizer = inner
        self._params = [p for group in inner.param_groups for p in group["params"]]
        mesh = inner.device_mesh if mesh is None else mesh
        self._meshes = [_state_mesh(inner, param, mesh) for param in self._params]
        self._rule, self._saved_replicas, self._rows = None, None, {}
        if checkpoint_id is not None:  # loading: map another number of replicas by the optimizer's rule
            saved = saved_replicas(checkpoint_id)
            rule = inner.options.on_topology_change
            rule = "mean" if strict is False and rule == "refuse" else rule
            if saved not in (None, inner.world_size) and not strict and rule != "refuse":
                self._rule, self._saved_replicas = rule, saved

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state: DTensors over the (replicate, shard) mesh, views of DistLion's buffers (or, to
        load a checkpoint of another number of replicas, buffers for every saved replica's rows of this shard)."""
        opt = self.optimizer
        opt._ensure_layout()  # state views of the current layout (a pending load is applied)
        state = {}
        for index, (param, (mesh, placements)) in enumerate(zip(self._params, self._meshes)):
            if param in opt.state:
                state[str(index)] = {key: self._saved_rows(index, key, value, param, mesh, placements)
                                     if self._rule else _stacked(value, param, mesh, placements)
                                     for key, value in opt.state[param].items()}
        meta = {"format": FORMAT, "replicas": self._saved_replicas or opt.world_size, "vote": VOTES.index(opt.vote),
                "step": opt._step, "parameters": len(self._params)}
        return {
            "state_by_replica": state,  # a size mismatch of dim 0 names the number of replicas
            "meta": torch.tensor([meta[field] for field in META_FIELDS], dtype=torch.int64),
            "param_groups": {str(i): torch.tensor(_group_values(group), dtype=torch.float64)
                             for i, group in enumerate(opt.param_groups)},
            "comm_stats": torch.tensor([getattr(opt.comm_stats, key) for key in CommStats.COUNTERS],
                                       dtype=torch.int64),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check what ``dcp.load`` read into ``state_dict()``'s tensors and apply it.

        The state tensors were read in place (they are views of DistLion's buffers); the
        step, the hyperparameters and the counters are applied here.
        """
        opt = self.optimizer
        saved = dict(zip(META_FIELDS, state_dict["meta"].tolist()))
        current = dict(zip(META_FIELDS, self.state_dict()["meta"].tolist()))
        groups = state_dict["param_groups"]
        saved["param groups"], current["param groups"] = len(groups), len(opt.param_groups)
        differ = [f"{field}: saved {saved[field]}, this run {current[field]}" for field in saved
                  if field != "step" and saved[field] != current[field]]
        if differ:
            raise ValueError(f"DistLion's DCP state does not fit this optimizer ({'; '.join(differ)}; vote codes: "
                             f"{dict(enumerate(VOTES))}): resume with the saved model, param groups, vote and number "
                             f"of replicas, or start the optimizer fresh")
        for index, tensors in state_dict["state_by_replica"].items():
            for key, value in tensors.items():
                check_finite(key, index, value.to_local())
        for index, group in enumerate(opt.param_groups):
            lr, beta1, beta2, weight_decay, beta = groups[str(index)].tolist()
            values = dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                          vote_ema_beta=None if math.isnan(beta) else beta)
            check_saved_group(index, values, group)
            group.update(values)
        if self._rule:
            self._apply_rule()
        opt._step = int(saved["step"])
        opt.comm_stats.load(dict(zip(CommStats.COUNTERS, state_dict["comm_stats"].tolist())))

    def _saved_rows(self, index: int, key: str, value: torch.Tensor, param: torch.Tensor, mesh: Any,
                    placements: list) -> torch.Tensor:
        """A DTensor of the saved replicas' rows of this rank's shard, replicated over the replicate dim."""
        from torch.distributed.tensor import DTensor, Replicate

        rows = self._rows.get((index, key))  # allocated once: load_state_dict reads what dcp.load wrote
        if rows is None:
            rows = torch.zeros((self._saved_replicas, *value.shape), dtype=value.dtype, device=value.device)
            self._rows[(index, key)] = rows
        shape = (self._saved_replicas, *param.shape)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(rows, mesh, [Replicate(), placements[1]], run_check=False, shape=shape,
                                  stride=stride)

    def _apply_rule(self) -> None:
        """Each replica's momentum from the saved replicas' rows, by the rule; the rest from the first source."""
        from distlion.checkpoint.elastic import MOMENTUM, sources

        opt = self.optimizer
        replica = opt.rank
        chosen = sources(self._rule, replica, self._saved_replicas, opt.world_size)
        for (index, key), rows in self._rows.items():
            target = opt.state[self._params[index]][key]
            picked = rows[chosen].float().mean(0) if key == MOMENTUM else rows[chosen[0]]
            target.copy_(picked.to(target.dtype))
        if replica == 0 and dist.get_rank() == 0:
            logger.warning("DistLion: resumed DCP state of %d replica(s) on %d: each replica's momentum by the %r "
                           "rule; masters and vote EMA copied, as they are the same on every replica",
                           self._saved_replicas, opt.world_size, self._rule)


def save_sharded(optimizer: DistLion, directory: str, mesh: Any = None) -> None:
    """Write ``optimizer``'s ``ShardedState`` to ``directory`` with DCP (call it on every rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"optimizer": ShardedState(optimizer, mesh)}, checkpoint_id=directory)


def load_sharded(optimizer: DistLion, directory: str, mesh: Any = None, *, missing: str) -> None:
    """Read ``optimizer``'s ``ShardedState`` from ``directory`` with DCP (another number of replicas mapped by
    ``on_topology_change``); ``missing``: what to do when there is none."""
    import torch.distributed.checkpoint as dcp

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist: {missing}")
    dcp.load({"optimizer": ShardedState(optimizer, mesh, checkpoint_id=directory)}, checkpoint_id=directory)


def saved_replicas(checkpoint_id: Any) -> int | None:
    """The number of replicas whose DistLion state a DCP checkpoint holds (None when it holds none)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint_id).read_metadata()
    sizes = {meta.size[0] for key, meta in metadata.state_dict_metadata.items()
             if ".state_by_replica." in key and hasattr(meta, "size")}
    if len(sizes) > 1:
        raise ValueError(f"{checkpoint_id} holds DistLion state of {sorted(sizes)} replicas (several optimizers?): "
                         f"load each with sharded_state(opt) on its own topology")
    return sizes.pop() if sizes else None


def _group_values(group: dict) -> list[float]:
    beta = group["vote_ema_beta"]
    return [group["lr"], *group["betas"], group["weight_decay"], math.nan if beta is None else beta]


def _state_mesh(optimizer: DistLion, param: torch.Tensor, mesh: Any) -> tuple[Any, list]:
    """The (replicate, shard) mesh and placements of ``param``'s state, stacked over replicas."""
    from torch.distributed.tensor import Shard

    if not is_sharded(param):
        raise ValueError(f"sharded_state saves the state of parameters sharded by FSDP2; a parameter of shape "
                         f"{tuple(param.shape)} is not. For replicated parameters save one file per rank "
                         f"(torch.save(opt.state_dict(), ...) or distlion.save)")
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    if mesh is None or not names or names[0] not in REPLICATE_DIMS:
        raise ValueError(f"sharded_state needs the (replicate, shard) mesh{f'; got dims {names!r}' if names else ''}: "
                         "build DistLion with device_mesh=mesh instead of process_group, or pass the mesh")
    if mesh.size(0) != optimizer.world_size:
        raise ValueError(f"the mesh's {names[0]!r} dim has {mesh.size(0)} ranks, but DistLion votes among "
                         f"{optimizer.world_size}: pass the mesh whose {names[0]!r} dim is DistLion's vote group")
    placement = param.placements[0]
    if mesh.ndim != 2 or param.device_mesh.mesh.tolist() not in mesh.mesh.tolist() or \
            not isinstance(placement, Shard) or type(placement) is not Shard:
        raise ValueError(f"sharded_state takes parameters sharded over the {list(names[1:])} dim of a 2-D "
                         f"(replicate, shard) mesh with one Shard(dim) placement; a parameter of shape "
                         f"{tuple(param.shape)} has placements {tuple(param.placements)} over ranks "
                         f"{param.device_mesh.mesh.tolist()}")
    return mesh, [Shard(0), Shard(placement.dim + 1)]


def _stacked(value: torch.Tensor, param: torch.Tensor, mesh: Any, placements: list) -> torch.Tensor:
    """``value`` (this rank's state of its local shard) as this replica's row of an (M, *shape) DTensor."""
    from torch.distributed.tensor import DTensor

    shape = (mesh.size(0), *param.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value.unsqueeze(0), mesh, placements, run_check=False, shape=shape, stride=stride)


# ------------------------------------------------------------------ failing together

def shortest_timeout(optimizers: Iterable[DistLion]) -> timedelta | None:
    """The shortest ``timeout`` of ``optimizers`` (``DistLion(timeout=...)``), or None when none sets one."""
    timeouts = [optimizer.timeout for optimizer in optimizers if optimizer.timeout is not None]
    return min(timeouts) if timeouts else None


def fail_together(action: Callable[[], T], *, source: str, timeout: timedelta | None = None, group: Any = None,
                  doing: str = "load their checkpoint from") -> T:
    """Run ``action()`` on every rank of ``group``; if it raises on any rank, raise on every rank.

    Call it on every rank (it makes one collective, an all_gather of a flag). The rank
    that failed raises its own error; the others raise a RuntimeError that names the
    failed ranks, what they were ``doing`` and ``source``, instead of waiting for them in
    a later collective. ``timeout`` (the optimizer's, ``DistLion(timeout=...)``) bounds
    the wait for a rank that never gets there (stopped, hung): ``CollectiveError`` then;
    None waits as long as the process group allows.
    """
    error: Exception | None = None
    result = None
    try:
        result = action()
    except Exception as caught:  # any failure must reach the other ranks before anyone raises
        error = caught
    failed = failed_ranks(error is not None, group, timeout)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"DistLion: rank(s) {failed} could not {doing} {source} (see their error); this "
                           "rank stops too instead of waiting for them.")
    return result


def failed_ranks(failed: bool, group: Any, timeout: timedelta | None = None) -> list[int]:
    """Return the ranks of ``group`` that report ``failed`` (one all_gather, waited for at most ``timeout``;
    no collective without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [0] if failed else []
    flag = torch.tensor([int(failed)], device=flag_device(group))
    flags = [torch.empty_like(flag) for _ in range(dist.get_world_size(group))]
    wait_for(dist.all_gather(flags, flag, group=group, async_op=True), "the exchange of the ranks' checkpoint "
             "outcomes", timeout)
    return [rank for rank, value in enumerate(flags) if value.item()]
