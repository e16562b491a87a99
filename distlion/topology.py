"""Who votes with whom: M nodes of G ranks, rank j of every node in one vote.

A node of G ranks (GPUs joined by a fast link) votes as one worker: its gradient is
reduced inside the node, rank j of the node owns chunk j of every bucket, and only the
M ranks that own the same chunk, one per node, exchange 1-bit signs (docs/design.md §6).
``ranks_per_node=1`` makes every rank a node of its own: the flat vote of N ranks.

Ranks ``[k*G, (k+1)*G)`` of the data-parallel group form node k, torchrun's rank order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor

AUTO = "auto"

# (ranks of the group, ranks_per_node) -> (node groups, vote groups); process groups are
# costly to create and every DistLion over the same ranks can share them.
_GROUPS: dict[tuple[tuple[int, ...], int], tuple[dict, dict]] = {}


@dataclass(frozen=True)
class NodeTopology:
    """This rank's place among ``nodes`` nodes of ``ranks_per_node`` ranks.

    Attributes:
        vote_group: the ``nodes`` ranks that vote together (None when there is one node).
        node_group: the ``ranks_per_node`` ranks of this node (None when there is one rank per node).
        nodes: M, the number of voters.
        ranks_per_node: G, the ranks that share one vote.
        node: k, this rank's node, its place in the vote.
        local_rank: j, this rank's place in the node: it owns chunk j of every bucket.
    """

    vote_group: Any
    node_group: Any
    nodes: int
    ranks_per_node: int
    node: int
    local_rank: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def rank(self) -> int:
        """Place in the data-parallel group: node * ranks_per_node + local_rank."""
        return self.node * self.ranks_per_node + self.local_rank

    def chunk(self, flat: Tensor) -> Tensor:
        """This rank's chunk of a whole-bucket tensor."""
        return chunk_of(flat, self.ranks_per_node, self.local_rank)

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.ranks_per_node} rank(s) per node"


def chunk_of(flat: Tensor, parts: int, index: int) -> Tensor:
    """Part ``index`` of ``flat`` cut into ``parts`` equal parts (a bucket's chunk owned by a node's rank)."""
    size = flat.numel() // parts
    return flat[index * size:(index + 1) * size]


def single_rank() -> NodeTopology:
    """One rank, no process group: plain Lion."""
    return NodeTopology(None, None, 1, 1, 0, 0)


def check_ranks_per_node(ranks_per_node: int | str) -> None:
    """Raise unless ``ranks_per_node`` is a positive int or "auto"."""
    if ranks_per_node == AUTO:
        return
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ValueError(f"Invalid ranks_per_node: {ranks_per_node!r}; use a positive int (the ranks of one "
                         f"node, e.g. its GPU count) or 'auto'")


def resolve_ranks_per_node(ranks_per_node: int | str, world_size: int, is_world: bool) -> int:
    """Turn ``ranks_per_node`` (an int or "auto") into G, checking that it divides ``world_size``.

    "auto" is the node's size when the default group spans more than one node
    (``WORLD_SIZE`` > it), else 1. The node's size is ``LOCAL_WORLD_SIZE`` (torchrun and
    Accelerate set it) or ``LOCAL_SIZE`` (the DeepSpeed launcher's name for it).
    """
    check_ranks_per_node(ranks_per_node)
    if ranks_per_node == AUTO:
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
        world = os.environ.get("WORLD_SIZE")
        if not (is_world and local and world and local.isdigit() and world.isdigit()):
            return 1
        local_size, env_world = int(local), int(world)
        if env_world != world_size or not 0 < local_size < env_world or env_world % local_size:
            return 1
        return local_size
    if world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the world size {world_size}: every "
                         f"node must have the same number of ranks. Use a divisor of {world_size}, e.g. the "
                         f"number of GPUs per node, or 1 to let every rank vote.")
    return ranks_per_node


def split_group(group: Any, ranks_per_node: int) -> NodeTopology:
    """Split ``group`` into nodes of ``ranks_per_node`` consecutive ranks; collective on its ranks.

    Every rank of ``group`` must call this with the same ``ranks_per_node`` (check that first:
    a disagreement here would hang in group creation).
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    nodes, node, local_rank = world_size // ranks_per_node, rank // ranks_per_node, rank % ranks_per_node
    if ranks_per_node == 1:
        return NodeTopology(group if world_size > 1 else None, None, nodes, 1, node, 0)
    if nodes == 1:
        return NodeTopology(None, group, 1, ranks_per_node, 0, local_rank)
    ranks = tuple(dist.get_process_group_ranks(group))
    key = (ranks, ranks_per_node)
    if key not in _GROUPS:
        _GROUPS[key] = ({}, {})
    node_groups, vote_groups = _GROUPS[key]
    # Only the members of a group create it (local synchronisation), so the order in which
    # different ranks create their two groups does not matter.
    if node not in node_groups:
        members = list(ranks[node * ranks_per_node:(node + 1) * ranks_per_node])
        node_groups[node] = dist.new_group(members, use_local_synchronization=True)
    if local_rank not in vote_groups:
        members = list(ranks[local_rank::ranks_per_node])
        vote_groups[local_rank] = dist.new_group(members, use_local_synchronization=True)
    return NodeTopology(vote_groups[local_rank], node_groups[node], nodes, ranks_per_node, node, local_rank)


def from_groups(vote_group: Any, node_group: Any) -> NodeTopology:
    """The topology of groups the caller built: ``node_group`` holds this node's ranks, ``vote_group``
    the rank with the same place in every node."""
    nodes, ranks_per_node = dist.get_world_size(vote_group), dist.get_world_size(node_group)
    return NodeTopology(vote_group if nodes > 1 else None, node_group if ranks_per_node > 1 else None,
                        nodes, ranks_per_node, dist.get_rank(vote_group), dist.get_rank(node_group))


def data_parallel_group(options: Any) -> Any:
    """The ranks DistLion's ``options`` name: a mesh's "replicate" dim, ``process_group``, or the world group
    when torch.distributed is initialised (None: a single rank)."""
    from distlion.local_shards import vote_group_of_mesh

    if options.device_mesh is not None:
        return vote_group_of_mesh(options.device_mesh)
    if options.process_group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return options.process_group


def resolve(options: Any, group: Any, params: list, agree: Any) -> NodeTopology:
    """Find this rank's nodes in ``group`` (``data_parallel_group``) from DistLion's ``options``: explicit
    groups, or ``ranks_per_node``.

    ``agree(groups, world_size, ranks_per_node)`` is called on every rank before any group
    is built, so that a rank with another layout or setting raises instead of hanging.
    Parameters sharded by FSDP make every rank a node of its own (FSDP reduced the
    gradient inside the node): ``ranks_per_node`` resolves to 1.
    """
    from distlion.local_shards import check_sharded_parameters, is_sharded

    ranks_per_node, node_group = options.ranks_per_node, options.node_group
    if any(is_sharded(p) for p in params):
        if node_group is not None and dist.get_world_size(node_group) > 1:
            raise ValueError("node_group with parameters sharded by FSDP: FSDP's reduce-scatter already gives "
                             "each rank its node's gradient; pass device_mesh=mesh (or process_group="
                             "mesh.get_group('replicate')) and no node_group")
        check_sharded_parameters(params, group, ranks_per_node)
        ranks_per_node = 1
    if node_group is not None:
        topology = from_groups(group, node_group)
        if ranks_per_node not in (AUTO, topology.ranks_per_node):
            raise ValueError(f"ranks_per_node={ranks_per_node!r} differs from the size of node_group "
                             f"({topology.ranks_per_node}); leave ranks_per_node at 'auto' with node_group")
        agree([group, node_group], topology.world_size, topology.ranks_per_node)
        return topology
    if group is None:
        _check_not_launched_alone()
        if ranks_per_node not in (AUTO, 1):
            raise ValueError(f"ranks_per_node={ranks_per_node!r} needs torch.distributed: initialise the "
                             f"process group first (e.g. launch with torchrun), or use ranks_per_node=1")
        return single_rank()
    world_size = dist.get_world_size(group)
    resolved = resolve_ranks_per_node(ranks_per_node, world_size, group is dist.group.WORLD)
    agree([group], world_size, resolved)
    return split_group(group, resolved)


def _check_not_launched_alone() -> None:
    """Raise when a launcher's ``WORLD_SIZE`` says there are other ranks but no process group joins them."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1:
        raise ValueError(f"DistLion was built before torch.distributed was initialised, but WORLD_SIZE={launched} "
                         f"says this is one of {launched} ranks: it would train alone and the replicas would drift "
                         f"apart. Call dist.init_process_group(...) before building DistLion (or pass "
                         f"process_group=...).")
