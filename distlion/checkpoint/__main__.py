"""Inspect, re-split and seal DistLion checkpoints offline, without the model or a process group.

    python -m distlion.checkpoint info DIR
        the run, save, step and topology, and every rank's file with its size and checksum verified
    python -m distlion.checkpoint reshard DIR OUT --world_size N [--ranks_per_node G] [--rule mean]
        write DIR's state for N ranks (G per node) into OUT, with its manifest: a run of that topology
        then loads OUT as its own, bitwise
    python -m distlion.checkpoint seal DIR
        check the per-rank files of a directory without a manifest (one complete save: every rank's
        file, one step, readable) and write the manifest; files of a save that did not finish are refused

Every command takes ``--index`` (which of the job's DistLion optimizers, default 0) and exits
with status 1 and a message naming the file when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import lru_cache

from distlion.buckets import plan_from_json
from distlion.checkpoint import elastic
from distlion.checkpoint.files import (CheckpointError, FileEntry, Manifest, find_state_files, manifest_path,
                                       read_verified, save_torch, state_file_name, write_atomically)
from distlion.checkpoint.resume import load_file


def info(directory: str, index: int) -> str:
    """A report of the checkpoint, every file read and verified against the manifest."""
    manifest = Manifest.read(directory, index)
    lines = [f"{manifest_path(directory, index)}", f"  run {manifest.run}, save {manifest.save}, step {manifest.step}",
             f"  topology: {manifest.describe()}, vote {manifest.vote}"
             + (", FSDP2 shards" if manifest.sharded else ""),
             f"  layout {manifest.layout}"]
    total = 0
    for entry in manifest.files:
        started = time.perf_counter()
        read_verified(directory, entry, manifest)
        total += entry.bytes
        lines.append(f"  rank {entry.rank}: {entry.name}  {entry.bytes:,} bytes  crc32 {entry.crc32:08x}  verified "
                     f"({time.perf_counter() - started:.2f} s)")
    lines.append(f"  {len(manifest.files)} file(s), {total:,} bytes, all verified")
    return "\n".join(lines)


def reshard(directory: str, out: str, world_size: int, ranks_per_node: int, rule: str, index: int) -> str:
    """Write ``directory``'s state re-split for ``world_size`` ranks of ``ranks_per_node`` into ``out``."""
    manifest = Manifest.read(directory, index)
    if manifest.plan is None or manifest.sharded:
        raise CheckpointError(f"{manifest_path(directory, index)} has no bucket plan (a wrapper's or FSDP2 shards' "
                              f"state): it resumes on its own topology only.")
    if world_size % ranks_per_node:
        raise ValueError(f"--world_size {world_size} is not a multiple of --ranks_per_node {ranks_per_node}")
    saved = {"world_size": manifest.world_size, "ranks_per_node": manifest.ranks_per_node}
    saved_plan, plan = plan_from_json(manifest.plan, manifest.world_size), plan_from_json(manifest.plan, world_size)

    @lru_cache(maxsize=None)
    def read_rank(rank: int) -> dict:
        return read_verified(directory, manifest.entry(rank), manifest)

    os.makedirs(out, exist_ok=True)
    save = f"s{manifest.step}-{os.urandom(4).hex()}"
    entries = []
    for rank in range(world_size):
        state = elastic.reshard(read_rank, saved, rank, world_size, ranks_per_node, saved_plan, plan, rule)
        state["distlion"].update(run=manifest.run, save=save)
        name = state_file_name(rank, world_size, index, save)
        size, crc32 = save_torch(os.path.join(out, name), state)
        entries.append(FileEntry(rank, name, size, crc32))
        print(f"  rank {rank} of {world_size}: {name} ({size:,} bytes)", file=sys.stderr)
    resharded = Manifest(run=manifest.run, save=save, step=manifest.step, world_size=world_size,
                         ranks_per_node=ranks_per_node, files=entries, layout=plan.signature(), vote=manifest.vote,
                         plan=manifest.plan)
    write_atomically(manifest_path(out, index), resharded.to_json().encode())
    return (f"{out}: step {manifest.step} of {manifest.describe()} re-split for {resharded.describe()} by the "
            f"{rule!r} rule")


def seal(directory: str, index: int) -> str:
    """Write the manifest of a directory of per-rank files saved without one, after checking they are one save."""
    path = manifest_path(directory, index)
    if os.path.exists(path):
        raise CheckpointError(f"{path} exists already: the checkpoint is sealed.")
    held = [f for f in find_state_files(directory) if f.index == index]
    sizes = {f.world_size for f in held}
    if len(sizes) != 1:
        raise CheckpointError(f"{directory} holds files of world sizes {sorted(sizes) or 'none'}: seal one save's "
                              f"files, in a directory of their own.")
    world_size = sizes.pop()
    ranks = sorted(f.rank for f in held)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        raise CheckpointError(f"{directory} lacks the files of rank(s) {missing} of {world_size} (or holds more than "
                              f"one per rank): the save did not finish. Load an earlier checkpoint.")
    states = [load_file(os.path.join(directory, f.name), kind="DistLion checkpoint") for f in sorted(
        held, key=lambda f: f.rank)]
    metas = [state.get("distlion", {}) if isinstance(state, dict) else {} for state in states]
    for f, meta in zip(sorted(held, key=lambda f: f.rank), metas):
        if meta.get("rank") != f.rank or meta.get("world_size") != world_size:
            raise CheckpointError(f"{os.path.join(directory, f.name)} holds rank {meta.get('rank')} of "
                                  f"{meta.get('world_size')}'s state, not rank {f.rank} of {world_size}'s: the files "
                                  f"were renamed or swapped.")
    steps = sorted({meta.get("step") for meta in metas}, key=str)
    if len(steps) != 1:
        by_rank = {meta.get("rank"): meta.get("step") for meta in metas}
        raise CheckpointError(f"{directory}'s files are of different steps ({by_rank}, by rank): a rank's save did "
                              f"not finish. Load an earlier checkpoint.")
    save = f"s{steps[0]}-{os.urandom(4).hex()}"
    entries = []
    for state, meta in zip(states, metas):
        state["distlion"] = {**meta, "run": save, "save": save}
        name = state_file_name(meta["rank"], world_size, index, save)
        entries.append(FileEntry(meta["rank"], name, *save_torch(os.path.join(directory, name), state)))
    first = metas[0]
    manifest = Manifest(run=save, save=save, step=int(steps[0] or 0), world_size=world_size,
                        ranks_per_node=first.get("ranks_per_node", 1), files=entries, layout=first.get("layout"),
                        vote=first.get("vote"), sharded="shard_rank" in first)
    write_atomically(path, manifest.to_json().encode())
    for f in held:
        os.remove(os.path.join(directory, f.name))
    return f"{path}: sealed step {manifest.step} of {manifest.describe()} ({len(entries)} files)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distlion.checkpoint", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("info", "show and verify a checkpoint"), ("seal", "write the manifest of complete files"),
                       ("reshard", "re-split a checkpoint for another topology")):
        command = commands.add_parser(name, help=text)
        command.add_argument("directory")
        command.add_argument("--index", type=int, default=0, help="which DistLion optimizer of the job (default 0)")
        if name == "reshard":
            command.add_argument("out")
            command.add_argument("--world_size", type=int, required=True)
            command.add_argument("--ranks_per_node", type=int, default=1)
            command.add_argument("--rule", choices=elastic.RULES, default="mean")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info(args.directory, args.index))
        elif args.command == "seal":
            print(seal(args.directory, args.index))
        else:
            print(reshard(args.directory, args.out, args.world_size, args.ranks_per_node, args.rule, args.index))
    except FileNotFoundError as error:
        print(f"error: {error.filename}: no such file (is it a DistLion checkpoint directory?)", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
