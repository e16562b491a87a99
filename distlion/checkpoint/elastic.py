"""Resume on another topology: the rule that maps M saved voters' momenta to M' new voters.

A voter is a node (its ``ranks_per_node`` ranks hold one chunk of its momentum each) or a
rank when a node is one rank. Every rule gives new voter j the mean of a set of saved
voters (``sources``):

- ``mean``: every new voter takes the mean of all saved voters;
- ``modulo``: new voter j takes saved voter j mod M;
- ``mean_deviation``: the mean plus each voter's own deviation where it exists. Growing
  (M' >= M), new voter j < M keeps its own momentum (the mean plus its deviation) and a new
  voter takes the mean; shrinking, new voter j takes the mean of the saved voters it
  stands for, j, j + M', j + 2M', ...

The master weights and the vote EMA are the same on every voter (they follow the voted
step), so they are copied from the first source voter; the step and the param groups are
the saved run's. The default rule (``DistLionOptions.on_topology_change``) was chosen by
``benchmarks/elastic.py``; README's checkpoint section gives its measured cost.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from distlion.buckets import BucketLayout, chunk_ranges

RULES = ("mean", "modulo", "mean_deviation")
MOMENTUM = "exp_avg"  # per voter; every other state tensor is the same on every voter


def sources(rule: str, voter: int, saved: int, new: int) -> list[int]:
    """The saved voters whose momenta new voter ``voter`` (of ``new``) averages, of ``saved`` saved voters."""
    if rule == "mean":
        return list(range(saved))
    if rule == "modulo":
        return [voter % saved]
    if rule == "mean_deviation":
        if new >= saved:
            return [voter] if voter < saved else list(range(saved))
        return list(range(voter, saved, new))
    raise ValueError(f"Unknown rule {rule!r} for a change of topology; use one of {RULES}")


def whole_tensors(states: list[dict], plan: BucketLayout, ranks_per_node: int) -> dict[int, dict[str, Tensor]]:
    """One voter's state as whole flat tensors per parameter index, from its ``ranks_per_node`` ranks' state dicts
    (in local-rank order): with one rank per node each tensor is the parameter's already, else each rank holds
    the part of it that falls in its chunk of the bucket."""
    whole: dict[int, dict[str, Tensor]] = {}
    if ranks_per_node == 1:  # the parameters' own tensors (read-only: they may be mapped from the file)
        (state,) = states
        return {slot.param_index: {key: value.reshape(-1) for key, value in
                                   _entry(state["state"], slot.param_index).items()}
                for bucket in plan.buckets for slot in bucket.slots}
    for bucket in plan.buckets:
        chunk = bucket.padded_numel // ranks_per_node
        for local_rank, state in enumerate(states):
            for slot, (lo, hi, start) in zip(bucket.slots, chunk_ranges(bucket, chunk, local_rank)):
                saved = _entry(state["state"], slot.param_index)
                target = whole.setdefault(slot.param_index, {})
                for key, value in saved.items():
                    if key not in target:
                        target[key] = torch.zeros(slot.numel, dtype=value.dtype)
                    target[key][start:start + hi - lo] = value.reshape(-1)
    return whole


def split(whole: dict[int, dict[str, Tensor]], plan: BucketLayout, ranks_per_node: int,
          local_rank: int) -> dict[int, dict[str, Tensor]]:
    """Local rank ``local_rank``'s part of a voter's whole tensors, as its ``state_dict()`` holds them."""
    parts: dict[int, dict[str, Tensor]] = {}
    for bucket in plan.buckets:
        chunk = bucket.padded_numel // ranks_per_node
        for slot, (lo, hi, start) in zip(bucket.slots, chunk_ranges(bucket, chunk, local_rank)):
            tensors = whole[slot.param_index]
            if ranks_per_node == 1:
                parts[slot.param_index] = {key: value.view(slot.shape) for key, value in tensors.items()}
            else:
                parts[slot.param_index] = {key: value[start:start + hi - lo].clone() for key, value in tensors.items()}
    return parts


def voter_mean(read_voter: Callable[[int], dict[int, dict[str, Tensor]]],
               voters: list[int]) -> dict[int, dict[str, Tensor]]:
    """The mean of ``voters``' momenta (accumulated in float32, kept in the saved dtype); every other tensor
    is the first voter's."""
    first = read_voter(voters[0])
    if len(voters) == 1:
        return first
    sums = {index: tensors[MOMENTUM].to(torch.float32, copy=True) for index, tensors in first.items()
            if MOMENTUM in tensors}
    for voter in voters[1:]:
        for index, tensors in read_voter(voter).items():
            if MOMENTUM in tensors:
                sums[index] += tensors[MOMENTUM].float()
    for index, total in sums.items():
        first[index] = {**first[index], MOMENTUM: total.div_(len(voters)).to(first[index][MOMENTUM].dtype)}
    return first


def reshard(read_rank: Callable[[int], dict], saved: dict[str, int], rank: int, world_size: int,
            ranks_per_node: int, saved_plan: BucketLayout, plan: BucketLayout, rule: str) -> dict[str, Any]:
    """Rank ``rank``'s state dict (of ``world_size`` ranks, ``ranks_per_node`` per node, laid out by ``plan``),
    built by ``rule`` from a checkpoint of another topology, reading every saved voter it needs itself.

    Args:
        read_rank: the saved state dict of a saved rank (each read once at most).
        saved: the saved run's ``world_size`` and ``ranks_per_node``.
        saved_plan: the saved run's bucket plan, rebuilt for this model (its signature must be the saved one).
    """
    first = read_rank(0)
    if saved_plan.signature() != first["distlion"]["layout"]:
        raise ValueError("The checkpoint's bucket layout does not match this model laid out for the saved "
                         f"topology ({saved_plan.describe()}): the model, its param groups or bucket_cap_mb differ "
                         "from the saved run's.")
    saved_g = saved["ranks_per_node"]

    def read_voter(voter: int) -> dict[int, dict[str, Tensor]]:
        ranks = range(voter * saved_g, (voter + 1) * saved_g)
        return whole_tensors([read_rank(saved_rank) for saved_rank in ranks], saved_plan, saved_g)

    chosen = sources(rule, rank // ranks_per_node, saved["world_size"] // saved_g, world_size // ranks_per_node)
    whole = voter_mean(read_voter, chosen)
    meta = dict(first["distlion"])
    meta.update(rank=rank, world_size=world_size, ranks_per_node=ranks_per_node, layout=plan.signature(),
                comm_stats=read_rank(rank)["distlion"].get("comm_stats", {}) if rank < saved["world_size"] else {})
    meta.pop("shard_rank", None)
    return {"state": split(whole, plan, ranks_per_node, rank % ranks_per_node),
            "param_groups": first["param_groups"], "distlion": meta}


def _entry(state: dict, index: int) -> dict[str, Tensor]:
    entry = state.get(index, state.get(str(index)))
    if entry is None:
        raise ValueError(f"The checkpoint holds no state for parameter {index}: it is incomplete or of another model")
    return entry
