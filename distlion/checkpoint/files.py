"""Crash-safe per-rank checkpoint files: written under a temporary name, flushed, renamed, then sealed
by a manifest that rank 0 writes last.

A save of optimizer ``index`` into ``directory`` leaves::

    distlion_optimizer{index}_rank{rank}_of_{world_size}.{save}.pt   one per rank
    distlion_optimizer{index}_manifest.json                          written last

``save`` is an id rank 0 draws for each save (``s{step}-{token}``), so a save never
overwrites the files the current manifest names: a crash at any point leaves the
previous checkpoint in the directory whole, and its manifest still names it. The
manifest names the run (the id of its first save, kept across resumes), its topology,
the step and every rank's file with its size and checksum (the CRC-32 of the file's
record table: ``torch.save`` writes a zip whose records each carry their own CRC-32).
Once the new manifest is in place, rank 0 removes the files of earlier saves.

The ranks meet through the process group's store, not through collectives: a save called
on some ranks only (inside ``if rank == 0``) then fails on those ranks within the
timeout, naming the fix, and cannot be mistaken for a training step's collective.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import weakref
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

STATE_FILE = "distlion_optimizer{index}_rank{rank}_of_{world_size}{save}.pt"
STATE_FILE_PATTERN = re.compile(r"^distlion_optimizer(\d+)_rank(\d+)_of_(\d+)(?:\.(s\d+-[0-9a-f]+))?\.pt$")
MANIFEST_FILE = "distlion_optimizer{index}_manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_TIMEOUT = timedelta(minutes=10)  # how long a save waits for the other ranks without DistLion(timeout=...)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is (no manifest, a damaged, swapped or foreign file)."""


@dataclass(frozen=True)
class StateFile:
    """One rank's state file, as its name describes it (``save`` is None for a file without a save id)."""

    index: int
    rank: int
    world_size: int
    save: str | None = None

    @property
    def name(self) -> str:
        return state_file_name(self.rank, self.world_size, self.index, self.save)


def state_file_name(rank: int, world_size: int, index: int = 0, save: str | None = None) -> str:
    """The name of rank ``rank`` of ``world_size``'s file of optimizer ``index`` (of save ``save``)."""
    return STATE_FILE.format(index=index, rank=rank, world_size=world_size, save=f".{save}" if save else "")


def manifest_path(directory: str, index: int = 0) -> str:
    return os.path.join(directory, MANIFEST_FILE.format(index=index))


def find_state_files(directory: str) -> list[StateFile]:
    """The per-rank state files in ``directory`` (none when it does not exist), sorted."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = []
    for match in map(STATE_FILE_PATTERN.match, names):
        if match:
            index, rank, world_size, save = match.groups()
            found.append(StateFile(int(index), int(rank), int(world_size), save))
    return sorted(found, key=lambda f: (f.index, f.world_size, f.rank, f.save or ""))


@dataclass
class FileEntry:
    rank: int
    name: str
    bytes: int
    crc32: int


@dataclass
class Manifest:
    """What a complete save holds: written last, so a directory without one holds no finished save."""

    run: str
    save: str
    step: int
    world_size: int
    ranks_per_node: int
    files: list[FileEntry]
    layout: str | None = None
    vote: str | None = None
    sharded: bool = False   # FSDP2 shards: each rank's file holds its shards only
    plan: dict | None = None  # the bucket plan (distlion.buckets.plan_to_json), to re-split offline
    format: int = MANIFEST_FORMAT
    extra: dict = field(default_factory=dict)

    @property
    def voters(self) -> int:
        return self.world_size // self.ranks_per_node

    def entry(self, rank: int) -> FileEntry:
        return self.files[rank]

    def describe(self) -> str:
        return f"{self.voters} voter(s) of {self.ranks_per_node} rank(s) (world size {self.world_size})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def read(cls, directory: str, index: int = 0) -> Manifest:
        """The manifest of optimizer ``index`` in ``directory``; raise ``CheckpointError`` naming what is wrong."""
        path = manifest_path(directory, index)
        try:
            with open(path) as handle:
                raw = json.load(handle)
            files = [FileEntry(**entry) for entry in raw.pop("files")]
            manifest = cls(files=files, **raw)
        except FileNotFoundError:
            raise
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"{path} is not a DistLion manifest ({error}); the directory's save is damaged: "
                                  f"load an earlier checkpoint.") from None
        if manifest.format != MANIFEST_FORMAT:
            raise CheckpointError(f"{path} has manifest format {manifest.format}; this DistLion reads format "
                                  f"{MANIFEST_FORMAT}: load it with the DistLion version that saved it.")
        if [entry.rank for entry in manifest.files] != list(range(manifest.world_size)):
            raise CheckpointError(f"{path} names the files of ranks {[e.rank for e in manifest.files]}, not of "
                                  f"ranks 0..{manifest.world_size - 1}: the manifest is damaged.")
        return manifest


# ------------------------------------------------------------------ writing


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (where the platform allows it)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_atomically(path: str, write: Any) -> None:
    """Write ``path`` through a temporary file in the same directory: ``write(file)`` fills it (``write`` may be
    the bytes themselves), then it is flushed, synced and renamed."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(write) if isinstance(write, (bytes, bytearray)) else write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_directory(directory)


def save_torch(path: str, state: Any) -> tuple[int, int]:
    """``torch.save(state)`` to ``path`` crash-safely (``write_atomically``); return its size and checksum.

    ``torch.save`` writes a zip whose every record carries its CRC-32; the checksum is the
    CRC-32 of that record table (``record_digest``), so the data is checksummed once, as it
    is written, and ``read_verified`` checks every record against it.
    """
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    saving = getattr(config, "save", None)
    computed = getattr(saving, "compute_crc32", True)
    if saving is not None:
        saving.compute_crc32 = True  # a record without its CRC-32 could not be verified
    try:
        write_atomically(path, lambda handle: torch.save(state, handle))
    finally:
        if saving is not None:
            saving.compute_crc32 = computed
    with zipfile.ZipFile(path) as archive:
        return os.path.getsize(path), record_digest(archive)


def record_digest(archive: zipfile.ZipFile) -> int:
    """The CRC-32 of a zip's record table: every record's name, size and CRC-32."""
    table = ";".join(f"{info.filename}:{info.file_size}:{info.CRC}" for info in archive.infolist())
    return zlib.crc32(table.encode())


# ------------------------------------------------------------------ reading


def read_verified(directory: str, entry: FileEntry, manifest: Manifest, map_location: Any = "cpu") -> Any:
    """Read ``entry``'s file and return its contents, refusing (naming the file) a missing, truncated, altered or
    foreign file: its size and checksum must be the manifest's, every record's data its CRC-32, its ``"distlion"``
    section this save's and rank's."""
    path = os.path.join(directory, entry.name)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing, though {manifest_path(directory)} names it: the checkpoint "
                              f"was copied in part. Load a complete copy.")
    size = os.path.getsize(path)
    if size != entry.bytes:
        raise CheckpointError(f"{path} holds {size} bytes, the manifest says {entry.bytes}: the file is "
                              f"truncated or was rewritten. Load a complete copy or an earlier checkpoint.")
    try:
        with zipfile.ZipFile(path) as archive:
            digest, damaged = record_digest(archive), archive.testzip()  # testzip checks every record's CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path} is not a whole torch.save file ({error}): the file was altered. Load a "
                              f"complete copy or an earlier checkpoint.") from None
    if digest != entry.crc32:
        raise CheckpointError(f"{path} does not match its checksum in the manifest: the file was altered or "
                              f"swapped with another. Load a complete copy or an earlier checkpoint.")
    if damaged is not None:
        raise CheckpointError(f"{path} does not match its checksum: its record {damaged} was altered. Load a "
                              f"complete copy or an earlier checkpoint.")
    # mapped, not read again: the tensors are paged in from the cache as they are used
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    return _checked_meta(path, state, entry, manifest)


def _checked_meta(path: str, state: Any, entry: FileEntry, manifest: Manifest) -> Any:
    """``state``, once its ``"distlion"`` section is shown to be of this save and of ``entry``'s rank."""
    meta = state.get("distlion", {}) if isinstance(state, dict) else {}
    if meta.get("save") != manifest.save or meta.get("run") != manifest.run:
        raise CheckpointError(f"{path} belongs to save {meta.get('save')!r} of run {meta.get('run')!r}, but the "
                              f"manifest is of save {manifest.save!r} of run {manifest.run!r}: a file from another "
                              f"run or save was copied in. Load a complete copy.")
    if meta.get("rank") != entry.rank:
        raise CheckpointError(f"{path} holds rank {meta.get('rank')}'s state, but the manifest names it as rank "
                              f"{entry.rank}'s: the files were swapped. Load a complete copy.")
    return state


# ------------------------------------------------------------------ the ranks meet at a save

_saves: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> {(directory, index): saves so far}


class SaveRendezvous:
    """The ranks of one save, meeting through the default store under a key of their own.

    Rank 0 draws the save id and writes the manifest once every rank has reported its
    file; the others wait for its word, so ``save`` returns on every rank only once the
    checkpoint is complete.
    """

    def __init__(self, optimizer: Any, directory: str, index: int, timeout: timedelta | None):
        self.rank, self.world_size = optimizer.rank, optimizer.world_size
        self.timeout = timeout or DEFAULT_TIMEOUT
        counts = _saves.setdefault(optimizer, {})
        key = (os.path.abspath(directory), index)
        counts[key] = counts.get(key, 0) + 1
        digest = zlib.crc32(key[0].encode())
        self.prefix = f"distlion/save/{digest:08x}/{index}/{counts[key]}"
        distributed = dist.is_available() and dist.is_initialized() and self.world_size > 1
        self.store = dist.distributed_c10d._get_default_store() if distributed else None

    def _wait(self, keys: list[str], waiting_for: str) -> None:
        try:
            self.store.wait(keys, self.timeout)
        except Exception:  # the store's timeout error (its type differs between versions)
            missing = [key for key in keys if not self.store.check([key])]
            raise RuntimeError(f"DistLion checkpoint save: rank {self.rank} waited {self.timeout} for {waiting_for} "
                               f"({len(missing)} of {len(keys)} missing). Every rank must save: call it on every rank, "
                               f"not inside `if rank == 0` (each rank writes its own momentum).") from None

    def save_id(self, step: int) -> str:
        """The id rank 0 draws for this save, as every rank gets it."""
        if self.store is None or self.rank == 0:
            save = f"s{step}-{secrets.token_hex(4)}"
            if self.store is not None:
                self.store.set(f"{self.prefix}/id", save)
            return save
        self._wait([f"{self.prefix}/id"], "rank 0 to start the save")
        return self.store.get(f"{self.prefix}/id").decode()

    def gather(self, report: dict) -> list[dict] | None:
        """Every rank's ``report`` at rank 0 (None elsewhere)."""
        if self.store is None:
            return [report]
        self.store.set(f"{self.prefix}/rank{self.rank}", json.dumps(report))
        if self.rank != 0:
            return None
        keys = [f"{self.prefix}/rank{rank}" for rank in range(self.world_size)]
        self._wait(keys, "the other ranks' files")
        return [json.loads(self.store.get(key)) for key in keys]

    def finish(self, error: str | None, manifest: Manifest | None = None) -> Manifest | None:
        """Rank 0 posts the outcome (an error, or the manifest it wrote); every other rank waits for it, raises
        if the save failed, and returns the manifest."""
        if self.store is None:
            return manifest
        if self.rank == 0:
            outcome = {"error": error, "manifest": asdict(manifest) if manifest else None}
            self.store.set(f"{self.prefix}/done", json.dumps(outcome))
            return manifest
        self._wait([f"{self.prefix}/done"], "rank 0 to write the manifest")
        outcome = json.loads(self.store.get(f"{self.prefix}/done"))
        if outcome["error"]:
            raise RuntimeError(f"DistLion checkpoint save failed: {outcome['error']}")
        raw = outcome["manifest"]
        return Manifest(files=[FileEntry(**entry) for entry in raw.pop("files")], **raw)


def save_files(state: dict, directory: str, optimizer: Any, index: int, step: int, manifest_fields: dict) -> str:
    """Write this rank's ``state`` crash-safely and, on rank 0, the manifest; return this rank's file's path.

    Call on every rank. ``state["distlion"]`` must be a dict; this adds the run and save ids to it.
    ``manifest_fields``: the topology fields of ``Manifest`` (world_size, ranks_per_node, layout, vote, sharded).
    """
    started = time.time()
    meeting = SaveRendezvous(optimizer, directory, index, getattr(optimizer, "timeout", None))
    save = meeting.save_id(step)
    run = getattr(optimizer, "checkpoint_run", None) or save
    path, report = None, {}
    try:
        os.makedirs(directory, exist_ok=True)
        state = {**state, "distlion": {**state["distlion"], "run": run, "save": save}}
        path = os.path.join(directory, state_file_name(optimizer.rank, optimizer.world_size, index, save))
        size, crc32 = save_torch(path, state)
        report = {"rank": optimizer.rank, "name": os.path.basename(path), "bytes": size, "crc32": crc32}
    except Exception as error:  # reported to rank 0, so that no rank waits for this one's file
        report = {"rank": optimizer.rank, "error": f"rank {optimizer.rank} could not write {path or directory}: "
                                                  f"{type(error).__name__}: {error}"}
        meeting.gather(report)
        if optimizer.rank == 0:
            meeting.finish(report["error"])
        raise
    reports = meeting.gather(report)
    if reports is not None:  # rank 0
        errors = [r["error"] for r in reports if "error" in r]
        try:
            if errors:
                raise RuntimeError("; ".join(errors))
            manifest = Manifest(run=run, save=save, step=step, files=[FileEntry(**r) for r in reports],
                                **manifest_fields)
            write_atomically(manifest_path(directory, index), manifest.to_json().encode())
        except Exception as error:
            meeting.finish(f"{type(error).__name__}: {error}")
            raise
        meeting.finish(None, manifest)
    else:
        manifest = meeting.finish(None)
        keep_manifest(directory, index, manifest)
    remove_superseded(directory, index, manifest, optimizer.rank, started)
    optimizer.checkpoint_run = run
    return path


def keep_manifest(directory: str, index: int, manifest: Manifest) -> None:
    """Write rank 0's ``manifest`` here too unless this directory holds it already: a directory on a disk of
    this node's own (not shared with rank 0) then names the save as well, and its ranks resume from it."""
    try:
        if Manifest.read(directory, index).save == manifest.save:
            return
    except (FileNotFoundError, CheckpointError):
        pass
    write_atomically(manifest_path(directory, index), manifest.to_json().encode())


def remove_superseded(directory: str, index: int, manifest: Manifest, rank: int, started: float) -> None:
    """Remove this rank's files of optimizer ``index`` that the manifest does not name (its earlier saves',
    unfinished ones'), and on rank 0 those of runs of another world size. A rank never removes another rank's
    file of this run, which may be of the next save already; temporary files go only when they are older than
    this save (``started``, a ``time.time()``): a killed write's."""
    keep = {entry.name for entry in manifest.files}
    for found in find_state_files(directory):
        mine = found.rank == rank if found.world_size == manifest.world_size else rank == 0
        if found.index == index and mine and found.name not in keep:
            try:
                os.remove(os.path.join(directory, found.name))
            except OSError:
                pass
    own = state_file_name(rank, manifest.world_size, index, "")[:-len(".pt")]
    manifest_temporary = f".{MANIFEST_FILE.format(index=index)}.tmp"
    for name in os.listdir(directory):  # what a write of this rank's that was killed left
        left = (name.startswith(f".{own}.") and ".pt.tmp" in name) or \
            (rank == 0 and name.startswith(manifest_temporary))
        try:
            if left and os.path.getmtime(os.path.join(directory, name)) < started:
                os.remove(os.path.join(directory, name))
        except OSError:
            pass


def remove_files(directory: str, index: int = 0) -> None:
    """Remove optimizer ``index``'s manifest, then its state files (the manifest first: no half checkpoint
    is ever left that looks whole)."""
    try:
        os.remove(manifest_path(directory, index))
    except FileNotFoundError:
        pass
    for found in find_state_files(directory):
        if found.index == index:
            try:
                os.remove(os.path.join(directory, found.name))
            except FileNotFoundError:
                pass
