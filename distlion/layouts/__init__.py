"""Layouts: where a step's tensors live, chosen once when DistLion is built (``build``).

- ``FlatLayout``: every rank votes; the parameters are views of flat buckets.
- ``NodeLayout``: a node of G ranks votes as one worker; reduce-scatter in, all-gather out.
- ``ShardLayout``: FSDP2's local shards, staged piece by piece.
"""

from __future__ import annotations

from distlion.layouts.base import BucketState, Layout
from distlion.layouts.flat import FlatLayout
from distlion.layouts.node import NodeLayout
from distlion.layouts.sharded import ShardLayout
from distlion.local_shards import ShardStaging, is_sharded, local_tensor

__all__ = ["BucketState", "FlatLayout", "Layout", "NodeLayout", "ShardLayout", "build", "layout_class"]


def layout_class(params: list, ranks_per_node: int) -> type[Layout]:
    """The layout for ``params`` (the optimizer's, in order) voting in nodes of ``ranks_per_node`` ranks."""
    if ranks_per_node > 1:
        return NodeLayout
    if params and all(is_sharded(p) for p in params) and ShardStaging.can_stage([local_tensor(p) for p in params]):
        return ShardLayout
    return FlatLayout


def build(param_groups, plan, options, topology, vote_rule, stats, state, previous=None) -> Layout:
    """Allocate the layout of ``plan`` for ``param_groups``; ``previous`` maps param index to state to carry."""
    params = [p for group in param_groups for p in group["params"]]
    cls = layout_class(params, topology.ranks_per_node)
    return cls(param_groups, plan, options, topology, vote_rule, stats, state, previous)
