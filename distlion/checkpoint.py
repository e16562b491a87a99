"""Per-rank optimizer state files: their names, what a directory holds, loading on every rank.

DistLion's momentum differs on every rank, so every rank saves and loads a file of its
own. Both adapters (``distlion.accelerate``, ``distlion.deepspeed``) keep them here, named

    distlion_optimizer{index}_rank{rank}_of_{world_size}.pt

``index`` numbers the job's DistLion optimizers (0 for the first); ``rank`` and
``world_size`` are the optimizer's own (its process group's), so a directory listing says
which run wrote it. A file holds the optimizer's ``state_dict()`` (or its wrapper's) with
a ``"distlion"`` section that records the saving run's topology (``TOPOLOGY_FIELDS``).

Loading reads files with ``torch.load(weights_only=True)`` (``load_file``): tensors and
plain Python values only, so a crafted file cannot run code, and a truncated or foreign
file is named as such. It checks the topology against this run's before anything is
applied and names every field that differs, the sizes on both sides and the fix.
``fail_together`` shares a failure on one rank (a missing, unreadable or mismatched file)
with every rank through one collective, so every rank raises instead of some waiting for
the others forever. DistLion's own ``load_state_dict`` checks the rest (layout, vote,
param groups).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from distlion.comm.flat import flag_device, wait_for
from distlion.optim import DistLion

STATE_FILE = "distlion_optimizer{index}_rank{rank}_of_{world_size}.pt"
STATE_FILE_PATTERN = re.compile(r"^distlion_optimizer(\d+)_rank(\d+)_of_(\d+)\.pt$")
# What a file must share with the run that loads it. Momentum is per rank and cannot be re-split.
TOPOLOGY_FIELDS = ("world_size", "ranks_per_node", "rank")
# How torch.load(weights_only=True) names a type it refuses: "GLOBAL argparse.Namespace" (torch < 2.4:
# "Unsupported class argparse.Namespace").
REFUSED_GLOBAL = re.compile(r"(?:GLOBAL|Unsupported class) ([\w.]+)")
# What torch.load raises on a damaged or foreign file (a truncated zip: RuntimeError or OSError).
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)

T = TypeVar("T")


@dataclass(frozen=True)
class StateFile:
    """One rank's state file, as its name describes it."""

    index: int
    rank: int
    world_size: int

    @property
    def name(self) -> str:
        return state_file_name(self.rank, self.world_size, self.index)


def state_file_name(rank: int, world_size: int, index: int = 0) -> str:
    """Return the name of the file that rank ``rank`` of ``world_size`` saves optimizer ``index`` in."""
    return STATE_FILE.format(index=index, rank=rank, world_size=world_size)


def find_state_files(directory: str) -> list[StateFile]:
    """Return the per-rank state files in ``directory`` (none when it does not exist), sorted."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = [StateFile(*map(int, match.groups())) for match in map(STATE_FILE_PATTERN.match, names) if match]
    return sorted(found, key=lambda f: (f.index, f.world_size, f.rank))


def topology(optimizer: DistLion) -> dict[str, int]:
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


def save(optimizer: Any, directory: str, index: int = 0) -> str:
    """Write this rank's DistLion state to ``directory`` (call it on every rank); return the file's path.

    For scripts launched with torchrun, beside the model's own checkpoint::

        distlion.save(opt, "ckpt")        # ckpt/distlion_optimizer0_rank{r}_of_{N}.pt
        distlion.load(opt, "ckpt")        # on resume, same world size and ranks_per_node
    """
    inner = _distlion(optimizer, "save")
    return save_state(inner.state_dict(), directory, inner, index)


def load(optimizer: Any, directory: str, index: int = 0) -> None:
    """Load this rank's own file from ``directory`` (call it on every rank); every rank raises if any
    rank cannot (missing, unreadable or foreign files, another world size, another model)."""
    inner = _distlion(optimizer, "load")
    fix = "resume with {world_size} processes (ranks_per_node={ranks_per_node}), or start the optimizer fresh"
    missing = "Save it with distlion.save(optimizer, directory) on every rank."
    fail_together(lambda: inner.load_state_dict(load_state(directory, inner, index, fix=fix,
                                                           missing=missing)), source=directory)


def _distlion(optimizer: Any, verb: str) -> DistLion:
    from distlion.wrappers import unwrap

    inner = unwrap(optimizer)
    if inner is None:
        raise TypeError(f"distlion.{verb} takes a DistLion optimizer (or a wrapper of one); got "
                        f"{type(optimizer).__name__}")
    return inner


def save_state(state: dict, directory: str, optimizer: DistLion, index: int = 0) -> str:
    """Write this rank's ``state`` (``optimizer.state_dict()`` or its wrapper's) to its file; return the path.

    A wrapper's state (DeepSpeed's fp16/bf16 optimizers) nests DistLion's: the file then
    gets a ``"distlion"`` section of its own with this run's topology.
    """
    if "distlion" not in state:
        state = {**state, "distlion": topology(optimizer)}
    path = os.path.join(directory, state_file_name(optimizer.rank, optimizer.world_size, index))
    os.makedirs(directory, exist_ok=True)
    torch.save(state, path)
    return path


def load_state(directory: str, optimizer: DistLion, index: int = 0, *, fix: str, missing: str) -> dict:
    """Read this rank's state file from ``directory`` and check it was saved by a run like this one.

    Args:
        directory: where ``save_state`` wrote the files.
        optimizer: this rank's DistLion (its rank and world size pick the file).
        index: which of the job's DistLion optimizers.
        fix: what to do when the topology differs; ``{world_size}`` (and any other
            ``TOPOLOGY_FIELDS``) is replaced by the saved run's value.
        missing: what to do when the directory holds no DistLion state at all.

    Raises:
        ValueError: the file is missing, unreadable (``load_file``), not a DistLion
            checkpoint, or was saved by a run of another topology; the message names what
            was found, both sides' values and ``fix``.
    """
    current = topology(optimizer)
    name = state_file_name(optimizer.rank, optimizer.world_size, index)
    path = os.path.join(directory, name)
    if os.path.isfile(path):
        state = load_file(path, kind="DistLion checkpoint")
        if not isinstance(state, dict) or not isinstance(state.get("distlion"), dict):
            raise ValueError(f"{path} is not a DistLion checkpoint: it holds a {type(state).__name__} without the "
                             "\"distlion\" section save_state writes. Point to a directory saved by DistLion.")
        saved = state["distlion"]
        mismatch = describe_mismatch(saved, current)
        if mismatch is not None:
            raise ValueError(f"{path} was saved by a run of {mismatch}. Momentum is per rank and cannot be "
                             f"re-split: {fix.format(**{**current, **saved})}.")
        return state
    held = [f for f in find_state_files(directory) if f.index == index]
    if not held:
        found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
        raise ValueError(f"No DistLion optimizer state for rank {optimizer.rank} in {directory}: expected {name} "
                         f"(one file per rank), found {found}. {missing}")
    # Files of another run: the most common world size there is the saved run's.
    sizes = [f.world_size for f in held]
    saved = {"world_size": max(set(sizes), key=lambda size: (sizes.count(size), size))}
    ranks = sorted({f.rank for f in held if f.world_size == saved["world_size"]})
    processes = f"{current['world_size']} process{'es' if current['world_size'] != 1 else ''}"
    mismatch = describe_mismatch(saved, current)
    if mismatch is None:  # the same world size: this rank's file alone is missing
        raise ValueError(f"{directory} holds DistLion optimizer state of ranks {ranks} of {processes}, but not "
                         f"{name}, rank {optimizer.rank}'s: the checkpoint is incomplete (a rank failed while "
                         f"saving, or the files were copied in part). Load a complete checkpoint.")
    raise ValueError(f"{directory} holds DistLion optimizer state of {len(ranks)} rank(s) (ranks {ranks}), but "
                     f"this run has {processes} and rank {optimizer.rank} has no {name}: it was saved by a run of "
                     f"{mismatch}. Momentum is per rank and cannot be re-split: "
                     f"{fix.format(**{**current, **saved})}.")


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


def fail_together(action: Callable[[], T], *, source: str, group: Any = None,
                  doing: str = "load their checkpoint from") -> T:
    """Run ``action()`` on every rank of ``group``; if it raises on any rank, raise on every rank.

    Call it on every rank (it makes one collective, an all_gather of a flag). The rank
    that failed raises its own error; the others raise a RuntimeError that names the
    failed ranks, what they were ``doing`` and ``source``, instead of waiting for them in
    a later collective.
    """
    error: Exception | None = None
    result = None
    try:
        result = action()
    except Exception as caught:  # any failure must reach the other ranks before anyone raises
        error = caught
    failed = failed_ranks(error is not None, group)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"DistLion: rank(s) {failed} could not {doing} {source} (see their error); this "
                           "rank stops too instead of waiting for them.")
    return result


def failed_ranks(failed: bool, group: Any) -> list[int]:
    """Return the ranks of ``group`` that report ``failed`` (one all_gather; no collective without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [0] if failed else []
    device = flag_device(group)
    flag = torch.tensor([int(failed)], device=device)
    flags = [torch.empty_like(flag) for _ in range(dist.get_world_size(group))]
    wait_for(dist.all_gather(flags, flag, group=group, async_op=True), "the exchange of the ranks' checkpoint "
             "outcomes", None)
    return [rank for rank, value in enumerate(flags) if value.item()]
