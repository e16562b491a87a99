"""DistLion's state in torch.distributed.checkpoint (DCP), for parameters sharded by FSDP2.

DCP saves each rank's part of a DTensor once and loads it back by global offsets. An
FSDP2 rank's momentum covers its local shards, but it also differs between replicas
(every node votes with its own momentum), so each state tensor of a parameter of shape
``S`` is saved as one DTensor of shape ``(M, *S)`` over the (replicate, shard) mesh,
placements ``(Shard(0), Shard(d + 1))`` where FSDP shards dim ``d``: replica m's
momentum is row m. Every rank saves and loads its own part exactly, and a resume with
another number of ranks per node ("shard" size) re-splits the rows by DCP's own
resharding. A resume with another number of replicas ``M`` fails in DCP's planning, on
every rank, with a size mismatch of ``(M, *S)`` under ``state_by_replica``: each replica's
momentum is its own.

Everything is a tensor (no pickled objects): the step, the vote, the number of
parameters and of replicas, each param group's hyperparameters and the byte counters
(rank 0's, as DCP keeps one copy of a plain tensor). ``load_state_dict`` checks them
and names what differs::

    import torch.distributed.checkpoint as dcp
    from distlion.dcp import sharded_state

    dcp.save({"model": model.state_dict(), "optimizer": sharded_state(opt)}, checkpoint_id=path)
    dcp.load({"model": model.state_dict(), "optimizer": sharded_state(opt)}, checkpoint_id=path)

DCP itself reads its ``.metadata`` file with pickle: load DCP checkpoints from storage
you trust. The per-rank files of ``distlion.checkpoint`` load weights-only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distlion.comm import CommStats
from distlion.local_shards import REPLICATE_DIM, is_sharded
from distlion.optim import DistLion
from distlion.vote import VOTES
from distlion.wrappers import unwrap

FORMAT = 1
META_FIELDS = ("format", "replicas", "vote", "step", "parameters")
GROUP_FIELDS = ("lr", "beta1", "beta2", "weight_decay", "vote_ema_beta")  # vote_ema_beta None is saved as nan


def sharded_state(optimizer: Any) -> "ShardedState":
    """Return ``optimizer``'s state as DCP's ``Stateful``: pass it to ``dcp.save`` and ``dcp.load``."""
    return ShardedState(optimizer)


class ShardedState:
    """A DistLion over FSDP2-sharded parameters, as ``torch.distributed.checkpoint.stateful.Stateful``."""

    def __init__(self, optimizer: Any):
        inner = unwrap(optimizer)
        if inner is None:
            raise TypeError(f"sharded_state needs a DistLion optimizer (or a wrapper of one); got "
                            f"{type(optimizer).__name__}")
        self.optimizer = inner
        self._params = [p for group in inner.param_groups for p in group["params"]]
        self._meshes = [_state_mesh(inner, param) for param in self._params]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state: DTensors over the (replicate, shard) mesh, views of DistLion's buffers."""
        opt = self.optimizer
        opt._ensure_layout()  # state views of the current layout (a pending load is applied)
        state = {}
        for index, (param, (mesh, placements)) in enumerate(zip(self._params, self._meshes)):
            if param in opt.state:
                state[str(index)] = {key: _stacked(value, param, mesh, placements)
                                     for key, value in opt.state[param].items()}
        meta = {"format": FORMAT, "replicas": opt.world_size, "vote": VOTES.index(opt.vote), "step": opt._step,
                "parameters": len(self._params)}
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
        differ = [f"{field}: saved {saved[field]}, this run {current[field]}" for field in META_FIELDS
                  if field != "step" and saved[field] != current[field]]
        if differ:
            raise ValueError(f"DistLion's DCP state does not fit this optimizer ({'; '.join(differ)}; vote codes: "
                             f"{dict(enumerate(VOTES))}): resume with the saved model, vote and number of replicas, "
                             f"or start the optimizer fresh")
        groups = state_dict["param_groups"]
        if len(groups) != len(opt.param_groups):
            raise ValueError(f"DistLion's DCP state has {len(groups)} param groups, this optimizer has "
                             f"{len(opt.param_groups)}")
        for index, group in enumerate(opt.param_groups):
            lr, beta1, beta2, weight_decay, beta = groups[str(index)].tolist()
            if math.isnan(beta) != (group["vote_ema_beta"] is None):
                raise ValueError(f"DistLion's DCP state was saved with vote_ema_beta="
                                 f"{None if math.isnan(beta) else beta!r} in param group {index}, this optimizer "
                                 f"has {group['vote_ema_beta']!r}: build it with the saved setting")
            group.update(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                         vote_ema_beta=None if math.isnan(beta) else beta)
        for index, tensors in state_dict["state_by_replica"].items():
            for key, value in tensors.items():
                if not torch.isfinite(value.to_local()).all():
                    raise ValueError(f"DistLion's DCP state '{key}' of parameter {index} holds inf or nan: the saved "
                                     f"run had overflowed or the checkpoint is damaged; load an earlier one")
        opt._step = int(saved["step"])
        opt.comm_stats.load(dict(zip(CommStats.COUNTERS, state_dict["comm_stats"].tolist())))


def _group_values(group: dict) -> list[float]:
    beta = group["vote_ema_beta"]
    return [group["lr"], *group["betas"], group["weight_decay"], math.nan if beta is None else beta]


def _state_mesh(optimizer: DistLion, param: Tensor) -> tuple[Any, list]:
    """The (replicate, shard) mesh and placements of ``param``'s state, stacked over replicas."""
    from torch.distributed.tensor import Shard

    if not is_sharded(param):
        raise ValueError(f"sharded_state saves the state of parameters sharded by FSDP2; a parameter of shape "
                         f"{tuple(param.shape)} is not. For replicated parameters save one file per rank "
                         f"(torch.save(opt.state_dict(), ...) or distlion.checkpoint)")
    mesh = optimizer.device_mesh
    placement = param.placements[0]
    if mesh is None or REPLICATE_DIM not in (mesh.mesh_dim_names or ()):
        raise ValueError("sharded_state needs the (replicate, shard) mesh: build DistLion with device_mesh=mesh "
                         "instead of process_group")
    shard_dim = [name for name in mesh.mesh_dim_names if name != REPLICATE_DIM]
    if mesh.ndim != 2 or param.device_mesh.mesh.tolist() not in mesh.mesh.tolist() or \
            not isinstance(placement, Shard) or type(placement) is not Shard:
        raise ValueError(f"sharded_state takes parameters sharded over the {shard_dim} dim of DistLion's 2-D "
                         f"device_mesh with one Shard(dim) placement; a parameter of shape {tuple(param.shape)} "
                         f"has placements {tuple(param.placements)} over ranks {param.device_mesh.mesh.tolist()}")
    return mesh, [Shard(0), Shard(placement.dim + 1)]


def _stacked(value: Tensor, param: Tensor, mesh: Any, placements: list) -> Tensor:
    """``value`` (this rank's state of its local shard) as row ``replica`` of an (M, *shape) DTensor."""
    from torch.distributed.tensor import DTensor

    shape = (mesh.size(0), *param.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value.unsqueeze(0), mesh, placements, run_check=False, shape=shape, stride=stride)
