"""Checks on a saved optimizer state, shared by ``DistLion.load_state_dict`` and DCP's ``ShardedState``.

Each raises a ValueError that names the bad entry and what to do: a state that loads
wrongly would make one replica drift from the others, or move a coordinate by lr forever.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distlion.buckets import BucketLayout
from distlion.checks import check_hyperparameters


def check_saved_meta(meta: dict[str, Any], world_size: int, ranks_per_node: int, rank: int, shard_rank: int | None,
                     plan: BucketLayout, vote: str) -> None:
    """Raise unless a ``state_dict()``'s "distlion" section was saved by this rank of this topology, on this
    layout and vote."""
    saved_nodes = (meta["world_size"], meta.get("ranks_per_node", 1))
    if saved_nodes != (world_size, ranks_per_node):
        raise ValueError(f"DistLion state was saved with world size {saved_nodes[0]} and ranks_per_node "
                         f"{saved_nodes[1]}, but this run has world size {world_size} and ranks_per_node "
                         f"{ranks_per_node}. Momentum is per rank (per chunk of a node) and cannot be re-split: "
                         f"resume with world size {saved_nodes[0]} and ranks_per_node={saved_nodes[1]}, or start "
                         f"the optimizer fresh.")
    if meta["rank"] != rank:
        raise ValueError(f"DistLion state of rank {meta['rank']} was given to rank {rank}: load the file this "
                         f"rank saved.")
    if meta.get("shard_rank") != shard_rank:
        raise ValueError(f"DistLion state of the FSDP shards of shard rank {meta.get('shard_rank')} was given to "
                         f"shard rank {shard_rank}: load the file this rank saved (name it by dist.get_rank(), "
                         f"which tells the shards apart).")
    if meta["layout"] != plan.signature():
        raise ValueError(f"DistLion state layout {meta['layout'][:12]} does not match this optimizer's "
                         f"({plan.describe()}): the model or param groups differ from the saved run.")
    if meta.get("vote", vote) != vote:
        raise ValueError(f"DistLion state was saved with vote={meta['vote']!r}, this optimizer has vote={vote!r}.")


def check_saved_group(index: int, saved: dict[str, Any], group: dict[str, Any]) -> None:
    """Raise unless saved param group ``index`` has valid values and the same scaled-step setting as ``group``."""
    try:
        check_hyperparameters(saved["lr"], saved["betas"], saved["weight_decay"], saved.get("vote_ema_beta"))
    except (KeyError, ValueError) as error:
        raise ValueError(f"DistLion state has a bad param group {index}: {error}") from None
    if (saved.get("vote_ema_beta") is None) != (group["vote_ema_beta"] is None):
        raise ValueError(f"DistLion state was saved with vote_ema_beta={saved.get('vote_ema_beta')!r} in param group "
                         f"{index}, this optimizer has {group['vote_ema_beta']!r}: build it with the saved setting "
                         f"(the scaled step keeps a per-coordinate EMA).")


def check_finite(key: str, index: Any, value: Tensor) -> None:
    """Raise if state tensor ``key`` of parameter ``index`` holds inf or nan."""
    if not torch.isfinite(value).all():
        raise ValueError(f"DistLion state '{key}' of parameter {index} holds inf or nan: the saved run had overflowed "
                         f"(e.g. an fp16 momentum) or the file is damaged; load an earlier checkpoint or start the "
                         f"optimizer fresh")


def check_saved_tensors(saved: Any, expected: dict[int, dict[str, Tensor]], shapes: dict[int, tuple]) -> None:
    """Raise unless ``saved`` holds, for every parameter index of ``expected``, each of its state tensors with
    the same shape, a floating dtype and finite values."""
    if not isinstance(saved, dict):
        raise ValueError(f"DistLion state's 'state' is a {type(saved).__name__}, not a dict of tensors")
    for index, state in expected.items():
        entry = saved.get(index, saved.get(str(index)))
        if not isinstance(entry, dict) or set(entry) != set(state):
            found = sorted(entry) if isinstance(entry, dict) else entry
            raise ValueError(f"DistLion state of parameter {index} (shape {shapes[index]}) holds {found}, expected "
                             f"{sorted(state)}: the file is incomplete or not this optimizer's")
        for key, target in state.items():
            value = entry[key]
            if not isinstance(value, Tensor) or value.shape != target.shape or not value.is_floating_point():
                described = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"DistLion state '{key}' of parameter {index} is {described}, expected a floating "
                                 f"tensor of shape {tuple(target.shape)}")
            check_finite(key, index, value)
