"""DistLion's state in torch.distributed.checkpoint (DCP), for parameters sharded by FSDP2.

DCP saves each rank's part of a DTensor once and loads it back by global offsets. An
FSDP2 rank's momentum covers its local shards, but it also differs between replicas
(every node votes with its own momentum), so each state tensor of a parameter of shape
``S`` is saved as one DTensor of shape ``(M, *S)`` over the (replicate, shard) mesh,
placements ``(Shard(0), Shard(d + 1))`` where FSDP shards dim ``d``: replica m's
momentum is row m. Every rank saves and loads its own part exactly, and a resume with
another number of ranks per node ("shard" size) re-splits the rows by DCP's own
resharding. A resume with another number of replicas maps the saved replicas' momenta by
``DistLion(on_topology_change=...)`` (``distlion.checkpoint.elastic``) when the state is
built with the checkpoint to load (``sharded_state(opt, checkpoint_id=path)``): every rank
then reads every saved replica's rows of its shard. Without it (or with ``strict=True``) it
fails in DCP's planning, on every rank, with a size mismatch under ``state_by_replica``.

Everything is a tensor (no pickled objects): the step, the vote, the number of
parameters and of replicas, each param group's hyperparameters and the byte counters
(rank 0's, as DCP keeps one copy of a plain tensor). ``load_state_dict`` checks them
and names what differs::

    import torch.distributed.checkpoint as dcp
    from distlion.dcp import sharded_state

    dcp.save({"model": model.state_dict(), "optimizer": sharded_state(opt)}, checkpoint_id=path)
    dcp.load({"model": model.state_dict(), "optimizer": sharded_state(opt, checkpoint_id=path)},
             checkpoint_id=path)

The mesh is DistLion's ``device_mesh`` (dims ``("replicate", "shard")``, or Accelerate's
``("dp_replicate", "dp_shard")``); a DistLion built with ``process_group=`` takes the mesh
as ``sharded_state(opt, mesh)``.

DCP itself reads its ``.metadata`` file with pickle: load DCP checkpoints from storage
you trust. The per-rank files of ``distlion.save`` load weights-only.
"""

from __future__ import annotations

from typing import Any

from distlion.integrations.common import FORMAT, GROUP_FIELDS, META_FIELDS, ShardedState, saved_replicas

__all__ = ["FORMAT", "GROUP_FIELDS", "META_FIELDS", "ShardedState", "saved_replicas", "sharded_state"]


def sharded_state(optimizer: Any, mesh: Any = None, checkpoint_id: Any = None,
                  strict: bool | None = None) -> ShardedState:
    """Return ``optimizer``'s state as DCP's ``Stateful``: pass it to ``dcp.save`` and ``dcp.load``.

    ``mesh``: the (replicate, shard) mesh to stack the replicas' state over; default the
    optimizer's ``device_mesh``. ``checkpoint_id``: to load, the checkpoint ``dcp.load``
    reads, so that a checkpoint of another number of replicas is mapped by the optimizer's
    ``on_topology_change`` rule (``strict=True`` refuses it instead).
    """
    return ShardedState(optimizer, mesh, checkpoint_id, strict)
