"""Save and resume one DistLion's per-rank state: what every entry point (``distlion.save``, Accelerate,
the Trainer, Lightning, DeepSpeed) calls.

``save_state`` writes this rank's file crash-safely and, on rank 0, the manifest
(``distlion.checkpoint.files``). ``load_state`` reads the manifest first, then:

- on the saved topology: this rank's own file, verified (a bitwise resume);
- on another one (another world size or ``ranks_per_node``): every saved voter's momentum it
  needs, mapped by the optimizer's ``on_topology_change`` rule (``distlion.checkpoint.elastic``),
  said once on rank 0; ``"refuse"`` (or ``strict=True``) raises instead, naming both
  topologies and the fix.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from functools import lru_cache
from typing import Any, Mapping

import torch

from distlion.buckets import plan_to_json
from distlion.checkpoint import elastic
from distlion.checkpoint.files import (CheckpointError, Manifest, find_state_files, manifest_path, read_verified,
                                       save_files, state_file_name)

logger = logging.getLogger(__name__)

# What a checkpoint's files record of the run that wrote them.
TOPOLOGY_FIELDS = ("world_size", "ranks_per_node", "rank")
# How torch.load(weights_only=True) names a type it refuses: "GLOBAL argparse.Namespace" (torch < 2.4:
# "Unsupported class argparse.Namespace").
REFUSED_GLOBAL = re.compile(r"(?:GLOBAL|Unsupported class) ([\w.]+)")
# What torch.load raises on a damaged or foreign file (a truncated zip: RuntimeError or OSError).
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)


def topology(optimizer: Any) -> dict[str, int]:
    """Return this run's ``TOPOLOGY_FIELDS`` as seen by ``optimizer``."""
    return {field: getattr(optimizer, field) for field in TOPOLOGY_FIELDS}


def describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Name every topology field that differs: ``"world size 2, but this run has world size 3"``, or None."""
    fields = [field for field in TOPOLOGY_FIELDS if field in saved and saved[field] != current[field]]
    if not fields:
        return None

    def values(of: Mapping[str, Any]) -> str:
        return " and ".join(f"{field.replace('_', ' ')} {of[field]}" for field in fields)

    return f"{values(saved)}, but this run has {values(current)}"


def save_state(state: dict, directory: str, optimizer: Any, index: int = 0) -> str:
    """Write this rank's ``state`` (``optimizer.state_dict()`` or its wrapper's) crash-safely; return its path.

    Call on every rank: rank 0 writes the manifest once every rank's file is in place, and
    every rank returns only then. A wrapper's state (DeepSpeed's fp16/bf16 optimizers) nests
    DistLion's: the file then gets a ``"distlion"`` section of its own with this run's topology.
    """
    own = "distlion" in state  # DistLion's own state_dict(), not a wrapper's nesting it
    if not own:
        state = {**state, "distlion": topology(optimizer)}
    layout = optimizer.layout
    fields = {"world_size": optimizer.world_size, "ranks_per_node": optimizer.ranks_per_node,
              "layout": layout.plan.signature(), "vote": optimizer.vote, "sharded": layout.shard_rank is not None,
              "plan": plan_to_json(layout.plan) if own else None}
    return save_files(state, directory, optimizer, index, optimizer.steps_taken, fields)


def load_state(directory: str, optimizer: Any, index: int = 0, *, fix: str, missing: str,
               strict: bool | None = None) -> dict:
    """This rank's state from ``directory``, for ``optimizer.load_state_dict`` (or its wrapper's).

    Args:
        directory: where ``save_state`` wrote the files.
        optimizer: this rank's DistLion (its rank, world size and ``ranks_per_node`` pick the files).
        index: which of the job's DistLion optimizers.
        fix: what to do when the topology differs and the resume is strict; ``{world_size}`` and
            ``{ranks_per_node}`` are replaced by the saved run's values.
        missing: what to do when the directory holds no DistLion state at all.
        strict: True refuses another topology, False maps it by ``on_topology_change`` (or "mean"
            where that is "refuse"); None (the default) follows ``on_topology_change``.

    Raises:
        ValueError: no state, no manifest (a save that did not finish), a file that is
            missing, truncated, swapped or from another run (``CheckpointError``), or another
            topology under a strict resume; the message names the file and the fix.
    """
    manifest = read_manifest(directory, optimizer, index, missing)
    current = topology(optimizer)
    saved = {"world_size": manifest.world_size, "ranks_per_node": manifest.ranks_per_node}
    if (manifest.world_size, manifest.ranks_per_node) == (optimizer.world_size, optimizer.ranks_per_node):
        state = read_verified(directory, manifest.entry(optimizer.rank), manifest)
        optimizer.checkpoint_run = manifest.run
        return state
    rule = optimizer.options.on_topology_change
    if strict is False and rule == "refuse":
        rule = "mean"
    if strict or rule == "refuse":
        raise ValueError(f"{directory} was saved by a run of "
                         f"{describe_mismatch({**saved, 'rank': optimizer.rank}, current)}, and this resume is strict "
                         f"(on_topology_change='refuse' or strict=True): {fix.format(**{**current, **saved})}. A "
                         f"resume that is not strict maps the saved voters' momenta to this run's (README, "
                         f"Checkpoints).")
    if manifest.plan is None:
        raise ValueError(f"{directory} holds a wrapper's optimizer state (DeepSpeed's bf16/fp16 optimizers nest "
                         f"DistLion's), which resumes on its own topology only: resume on world size "
                         f"{manifest.world_size} with ranks_per_node={manifest.ranks_per_node}.")
    if manifest.sharded or optimizer.layout.shard_rank is not None:
        raise ValueError(f"{directory} holds per-rank files of FSDP2 shards; a resume on another topology reshards "
                         f"them only through DCP: save with distlion.dcp (or Accelerate's FSDP2 save_state), or "
                         f"resume on world size {manifest.world_size} with ranks_per_node={manifest.ranks_per_node}.")

    state = _resharded(directory, manifest, optimizer, rule)
    if optimizer.rank == 0:
        logger.warning("DistLion: resumed %s (step %d), saved by %s, on %d voter(s) of %d rank(s) (world size %d): "
                       "each new voter's momentum by the %r rule; masters and vote EMA copied, as they are the same "
                       "on every voter", directory, manifest.step, manifest.describe(),
                       optimizer.world_size // optimizer.ranks_per_node, optimizer.ranks_per_node,
                       optimizer.world_size, rule)
    optimizer.checkpoint_run = manifest.run
    return state


def _resharded(directory: str, manifest: Manifest, optimizer: Any, rule: str) -> dict:
    """This rank's state mapped by ``rule`` from a checkpoint of another topology: each saved voter its voter
    needs is read and verified here (every saved voter, under "mean")."""
    @lru_cache(maxsize=None)
    def read_rank(rank: int) -> dict:
        return read_verified(directory, manifest.entry(rank), manifest)

    saved = {"world_size": manifest.world_size, "ranks_per_node": manifest.ranks_per_node}
    return elastic.reshard(read_rank, saved, optimizer.rank, optimizer.world_size, optimizer.ranks_per_node,
                           optimizer.plan_for(manifest.world_size), optimizer.layout.plan, rule)


def read_manifest(directory: str, optimizer: Any, index: int, missing: str) -> Manifest:
    """The manifest of optimizer ``index`` in ``directory``; raise naming what the directory holds instead."""
    try:
        return Manifest.read(directory, index)
    except FileNotFoundError:
        pass
    held = [f for f in find_state_files(directory) if f.index == index]
    name = os.path.basename(manifest_path(directory, index))
    if not held:
        found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
        raise ValueError(f"No DistLion optimizer state for rank {optimizer.rank} in {directory}: expected {name} "
                         f"and one file per rank ({state_file_name(optimizer.rank, optimizer.world_size, index)}, "
                         f"...), found {found}. {missing}")
    raise CheckpointError(f"{directory} holds DistLion state files ({', '.join(f.name for f in held[:4])}"
                          f"{', ...' if len(held) > 4 else ''}) but no manifest {name}: the save that wrote them did "
                          f"not finish (a rank failed or was stopped while saving), or they were written before "
                          f"DistLion wrote manifests. Load an earlier checkpoint; if these files are one complete "
                          f"save, `python -m distlion.checkpoint seal {directory}` checks them and writes the "
                          f"manifest.")


def load_file(path: str, *, kind: str, map_location: Any = "cpu") -> Any:
    """Return ``torch.load(path, weights_only=True)``; raise a ValueError naming ``path`` if that fails.

    ``weights_only`` unpickles tensors and plain Python values only, so a crafted file
    cannot run code. Types a trusted file needs beyond those are allowed by the caller,
    around the call: ``with torch.serialization.safe_globals([MyType]): ...``.

    Args:
        path: the file.
        kind: what the file should be, for the message ("DistLion checkpoint").
        map_location: as in ``torch.load``.

    Raises:
        ValueError: the file holds a type ``weights_only`` refuses (named in the message),
            or it is truncated or not a ``kind`` at all. A missing or unreadable file
            raises the ``OSError`` that says so.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # about the path, not the contents: the error says so itself
    except UNREADABLE as error:
        refused = REFUSED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused is not None:
            name = refused.group(1)
            raise ValueError(
                f"{path} holds a pickled {name}, which torch.load(weights_only=True) refuses: unpickling anything but "
                "tensors and plain Python values can run code, so the file is not loaded. If you saved that type "
                f"yourself and trust the file, load inside torch.serialization.safe_globals([{name}]).") from error
        raise ValueError(f"{path} is truncated or not a {kind} (torch.load raised {type(error).__name__}). "
                         "Save it again, or load a complete copy.") from error
