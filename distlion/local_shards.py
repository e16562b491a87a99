"""DTensor parameters (FSDP2's ``fully_shard``): the local shard is what a rank updates and votes on.

Under ``fully_shard(module, mesh=mesh["shard"])`` of a (replicate, shard) mesh, every
parameter and gradient is a DTensor sharded over the node's ranks, and its gradient is
the node's mean (FSDP's reduce-scatter). DistLion then lays out each rank's local shards,
and rank j of every replica (the "replicate" group, one rank per node) votes on them
(docs/design.md §6). FSDP owns the shards' storage (it all-gathers from its own buffers),
so DistLion copies the shards into its buckets and the updated values back, instead of
making the parameters views of the buckets.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.buckets import Bucket
from distlion.topology import AUTO

REPLICATE_DIM = "replicate"
# What a mesh may call its replicate dim: torchtitan's name and Accelerate's ParallelismConfig's.
REPLICATE_DIMS = (REPLICATE_DIM, "dp_replicate")


def _dtensor_type() -> type | None:
    # A DTensor exists only once torch.distributed.tensor was imported; importing it costs
    # about half a second, so a job without DTensors never pays for it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(param: Tensor) -> bool:
    """True for a DTensor parameter (whatever its placements)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(param, dtensor)


def is_sharded(param: Tensor) -> bool:
    """True for a DTensor whose ranks hold different parts of it (any placement but Replicate)."""
    return is_dtensor(param) and not all(placement.is_replicate() for placement in param.placements)


def local_tensor(param: Tensor) -> Tensor:
    """The tensor this rank holds of ``param``: its local shard for a DTensor, else ``param`` itself."""
    return param.to_local().detach() if is_dtensor(param) else param


def local_grad(param: Tensor) -> Tensor | None:
    """This rank's part of ``param.grad`` (None when there is none)."""
    grad = param.grad
    return grad.to_local() if grad is not None and is_dtensor(grad) else grad


def local_param_groups(param_groups: list[dict]) -> list[dict]:
    """``param_groups`` with each DTensor replaced by its local shard (same ``requires_grad``), to lay out."""
    def local(param: Tensor) -> Tensor:
        return local_tensor(param).requires_grad_(param.requires_grad) if is_dtensor(param) else param

    return [{**group, "params": [local(p) for p in group["params"]]} for group in param_groups]


def replicate_dim(device_mesh: Any) -> str:
    """The name of ``device_mesh``'s dim whose ranks hold the same shards: "replicate", or "dp_replicate" in
    the mesh Accelerate builds from ``ParallelismConfig(dp_replicate_size=M, dp_shard_size=G)``."""
    names = device_mesh.mesh_dim_names or ()
    for name in REPLICATE_DIMS:
        if name in names:
            return name
    raise ValueError(f"device_mesh has dims {names!r}, none of {REPLICATE_DIMS}: build it as "
                     f"init_device_mesh(device, (M, G), mesh_dim_names=('replicate', 'shard')) and shard "
                     f"with fully_shard(module, mesh=mesh['shard']) (or take Accelerate's, built from "
                     f"ParallelismConfig(dp_replicate_size=M, dp_shard_size=G)), or pass process_group instead")


def vote_group_of_mesh(device_mesh: Any) -> Any:
    """The process group of ``device_mesh``'s replicate dim (``replicate_dim``): the ranks that hold the same
    shards."""
    return device_mesh.get_group(replicate_dim(device_mesh))


def check_sharded_parameters(params: list[Tensor], vote_group: Any, ranks_per_node: int | str) -> None:
    """Raise if parameters sharded over a node's ranks meet a node setting, or ranks that hold other shards.

    FSDP already reduces the gradient inside the node, so the node's ranks must not vote
    again (``ranks_per_node`` 1 or "auto"), and ``vote_group`` must hold one rank of each
    shard group: two ranks that hold different shards would vote on unrelated coordinates.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return
    for param in sharded:
        if param.device_mesh.ndim != 1:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is sharded over a {param.device_mesh.ndim}-D "
                             f"mesh (placements {tuple(param.placements)}); DistLion takes parameters sharded over "
                             f"one mesh dim: fully_shard(module, mesh=mesh['shard']), and DistLion(..., "
                             f"device_mesh=mesh) votes across the 'replicate' dim")
    if ranks_per_node not in (AUTO, 1):
        raise ValueError(f"ranks_per_node={ranks_per_node!r} with parameters sharded by FSDP (placements "
                         f"{tuple(sharded[0].placements)}): FSDP's reduce-scatter already gives each rank its "
                         f"node's gradient. Leave ranks_per_node at 'auto' (or 1), pass no node_group, and vote "
                         f"across replicas: DistLion(..., device_mesh=mesh) or "
                         f"process_group=mesh.get_group('replicate')")
    voters = set(dist.get_process_group_ranks(vote_group)) if vote_group is not None else {dist.get_rank()}
    for param in sharded:
        peers = sorted(voters & set(param.device_mesh.mesh.tolist()))
        if len(peers) > 1:
            raise ValueError(f"process_group holds ranks {peers}, which hold different shards of a parameter of "
                             f"shape {tuple(param.shape)} (placements {tuple(param.placements)}): they would vote "
                             f"on unrelated coordinates. Vote across replicas only: DistLion(..., "
                             f"device_mesh=mesh) or process_group=mesh.get_group('replicate')")


def shard_groups(params: list[Tensor]) -> list[Any]:
    """The process groups that parameters are sharded over (one per mesh, usually one): the ranks of a
    replica that must agree on a skip, since each sees the non-finite values of its own shards only."""
    groups = {}
    for param in params:
        if is_sharded(param) and param.device_mesh.size() > 1:
            groups.setdefault(tuple(param.device_mesh.mesh.tolist()), param.device_mesh.get_group())
    return list(groups.values())


def copy_shards(targets: list[Tensor], sources: list[Tensor]) -> None:
    """Copy ``sources`` into ``targets`` in one foreach call (bucket views and local shards)."""
    if targets:
        torch._foreach_copy_(targets, sources)


# ------------------------------------------------------------------ staging

# Coordinates staged at a time: 1/32 of this rank's coordinates, within [2**16, 2**22] (256 KiB to 16 MiB
# of fp32) and a multiple of a sign word's 64: scratch stays small beside the shards, pieces few. PIECE
# fixes it (tests).
PIECE: int | None = None
PIECE_BOUNDS = (1 << 16, 1 << 22)


@dataclass(frozen=True)
class Piece:
    """Coordinates ``[lo, hi)`` of a bucket, and where they come from: ``segments`` of
    (member in the bucket, start in its flat local shard, start in the piece, length)."""

    lo: int
    hi: int
    segments: tuple[tuple[int, int, int, int], ...]


def piece_size(numel: int) -> int:
    """Coordinates per piece for a rank holding ``numel`` coordinates of shards."""
    if PIECE is not None:
        return PIECE
    low, high = PIECE_BOUNDS
    return min(max(-(-numel // 32 // 64) * 64, low), high)


def pieces_of(bucket: Bucket, piece: int) -> list[Piece]:
    """Cut ``bucket`` into pieces of ``piece`` coordinates (the last may be shorter)."""
    pieces = []
    for lo in range(0, bucket.padded_numel, piece):
        hi = min(lo + piece, bucket.padded_numel)
        segments = tuple((member, a - slot.offset, a - lo, b - a)
                         for member, slot in enumerate(bucket.slots)
                         for a, b in [(max(slot.offset, lo), min(slot.offset + slot.numel, hi))] if a < b)
        pieces.append(Piece(lo, hi, segments))
    return pieces


class ShardStaging:
    """FSDP2's local shards and gradients, staged piece by piece through two small scratch buffers.

    FSDP owns the shards' storage and the gradients, so DistLion keeps no bucket copy of
    either: packing gathers a piece of the gradients into scratch, and applying gathers it
    again (for the momentum), copies the piece's parameter values in, updates them and
    copies them back. Memory: two pieces per dtype instead of two copies of the shards.
    """

    def __init__(self, buckets: list[Bucket], shards: list[list[Tensor]]):
        piece = piece_size(sum(bucket.padded_numel for bucket in buckets))
        self.pieces = [pieces_of(bucket, piece) for bucket in buckets]
        self.shards = [[shard.view(-1) for shard in members] for members in shards]
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for bucket in buckets:
            key = (bucket.device, bucket.dtype)
            sizes[key] = max(sizes.get(key, 0), min(piece, bucket.padded_numel))
        self._grads = {key: torch.zeros(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
        self._values = {key: torch.zeros(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}

    @staticmethod
    def can_stage(shards: list[Tensor]) -> bool:
        """True when every local shard is contiguous (FSDP's Shard(0)), so it has a flat view."""
        return all(shard.is_contiguous() for shard in shards)

    def gather(self, index: int, piece: Piece, grads: list[Tensor | None], bucket: Bucket,
               grad_scale: Tensor | None) -> Tensor:
        """The piece of the bucket's gradients (zero where a parameter has none, and in the padding)."""
        out = self._grads[(bucket.device, bucket.dtype)][:piece.hi - piece.lo]
        out.zero_()
        for member, start, at, length in piece.segments:
            grad = grads[member]
            if grad is not None:
                out[at:at + length].copy_(grad.reshape(-1)[start:start + length])
        if grad_scale is not None:
            out.mul_(grad_scale.double().reciprocal().float())
        return out

    def load(self, index: int, piece: Piece, bucket: Bucket) -> Tensor:
        """The piece of the bucket's parameter values, copied from the local shards."""
        out = self._values[(bucket.device, bucket.dtype)][:piece.hi - piece.lo]
        out.zero_()
        for member, start, at, length in piece.segments:
            out[at:at + length].copy_(self.shards[index][member][start:start + length])
        return out

    def store(self, index: int, piece: Piece, values: Tensor) -> None:
        """Copy the updated piece back into the local shards."""
        for member, start, at, length in piece.segments:
            self.shards[index][member][start:start + length].copy_(values[at:at + length])
