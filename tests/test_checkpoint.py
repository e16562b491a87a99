"""distlion.checkpoint: per-rank file names, discovery, weights-only loading, the topology check, failing together.

The multi-process tests run real gloo ranks (tests/multiprocess.py), each bounded by a
timeout: a rank that waits for a failed one fails the test instead of hanging it.
"""

import argparse
import os
import re
import signal
import struct
import time
import zipfile

import pytest
import torch
import torch.distributed as dist

from distlion import DistLion
from distlion.checkpoint import (StateFile, describe_mismatch, fail_together, find_state_files, load_file,
                                 load_state, save_state, state_file_name)
from distlion.checkpoint.files import CheckpointError, Manifest, manifest_path, record_digest
from multiprocess import run_ranks

FIX = "relaunch with {world_size} ranks"
MISSING = "Save it with distlion."


def _optimizer(seed: int = 0) -> DistLion:
    torch.manual_seed(seed)
    return DistLion(torch.nn.Linear(4, 3).parameters(), lr=1e-2)


def test_state_file_names_say_which_run_and_save_wrote_them():
    assert state_file_name(0, 1) == "distlion_optimizer0_rank0_of_1.pt"
    assert state_file_name(3, 8, index=2, save="s15-0a1b2c3d") == "distlion_optimizer2_rank3_of_8.s15-0a1b2c3d.pt"
    assert StateFile(index=1, rank=2, world_size=4, save="s1-ff").name == "distlion_optimizer1_rank2_of_4.s1-ff.pt"


def test_discovery_lists_state_files_only(tmp_path):
    for name in (state_file_name(1, 2, save="s3-ab"), state_file_name(0, 2), state_file_name(0, 4, index=1),
                 "optimizer.bin", "distlion_rank0_of_2.pt", "distlion_optimizer0_rank0_of_2.pt.tmp",
                 ".distlion_optimizer0_rank0_of_2.s3-ab.pt.tmp12"):
        (tmp_path / name).write_bytes(b"")
    assert find_state_files(str(tmp_path)) == [StateFile(0, 0, 2), StateFile(0, 1, 2, "s3-ab"), StateFile(1, 0, 4)]
    assert find_state_files(str(tmp_path / "missing")) == []


def _stepped(seed: int = 0) -> DistLion:
    optimizer = _optimizer(seed)
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def test_save_and_load_round_trip_through_the_manifest(tmp_path):
    optimizer = _stepped()
    path = save_state(optimizer.state_dict(), str(tmp_path / "ckpt"), optimizer)
    assert re.fullmatch(r"distlion_optimizer0_rank0_of_1\.s1-[0-9a-f]{8}\.pt", os.path.basename(path))
    manifest = Manifest.read(str(tmp_path / "ckpt"))
    assert (manifest.step, manifest.world_size, manifest.ranks_per_node, manifest.run) == (1, 1, 1, manifest.save)
    assert manifest.files[0].name == os.path.basename(path) and manifest.files[0].bytes == os.path.getsize(path)
    state = load_state(str(tmp_path / "ckpt"), optimizer, fix=FIX, missing=MISSING)
    fresh = _optimizer()
    fresh.load_state_dict(state)
    assert fresh.state_dict()["distlion"]["step"] == 1


def test_a_second_save_replaces_the_first_and_keeps_the_run(tmp_path):
    optimizer = _stepped()
    first = save_state(optimizer.state_dict(), str(tmp_path), optimizer)
    optimizer.step()
    second = save_state(optimizer.state_dict(), str(tmp_path), optimizer)
    manifest = Manifest.read(str(tmp_path))
    assert not os.path.exists(first) and os.path.exists(second) and manifest.step == 2
    first_save = re.search(r"\.(s1-[0-9a-f]{8})\.pt$", first).group(1)
    assert manifest.run == first_save and manifest.save.startswith("s2-")  # the run is named by its first save
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(second), "distlion_optimizer0_manifest.json"])
    resumed = _optimizer()
    load_state(str(tmp_path), resumed, fix=FIX, missing=MISSING)
    assert resumed.checkpoint_run == manifest.run


def test_a_wrapper_state_gets_the_topology_section(tmp_path):
    optimizer = _optimizer()
    save_state({"cur_scale": 256.0, "optimizer_state_dict": optimizer.state_dict()}, str(tmp_path), optimizer)
    state = load_state(str(tmp_path), optimizer, fix=FIX, missing=MISSING)
    section = {k: v for k, v in state["distlion"].items() if k not in ("run", "save")}
    assert section == {"world_size": 1, "ranks_per_node": 1, "rank": 0} and state["cur_scale"] == 256.0


def test_mismatch_names_every_field_that_differs():
    assert describe_mismatch({"world_size": 2, "rank": 1}, {"world_size": 4, "rank": 3}) == \
        "world size 2 and rank 1, but this run has world size 4 and rank 3"
    assert describe_mismatch({"world_size": 2, "rank": 0}, {"world_size": 4, "rank": 0}) == \
        "world size 2, but this run has world size 4"
    assert describe_mismatch({"world_size": 4, "rank": 0, "step": 9}, {"world_size": 4, "rank": 0}) is None
    assert describe_mismatch({}, {"world_size": 4, "rank": 0}) is None  # nothing recorded, nothing to compare


def test_files_without_a_manifest_are_refused_with_the_fix(tmp_path):
    for rank in (0, 1):
        torch.save({"distlion": {"world_size": 2, "rank": rank}}, tmp_path / state_file_name(rank, 2))
    with pytest.raises(CheckpointError) as error:
        load_state(str(tmp_path), _optimizer(), fix=FIX, missing=MISSING)
    message = str(error.value)
    assert "holds DistLion state files (distlion_optimizer0_rank0_of_2.pt, distlion_optimizer0_rank1_of_2.pt) but " \
           "no manifest distlion_optimizer0_manifest.json: the save that wrote them did not finish" in message
    assert f"python -m distlion.checkpoint seal {tmp_path}" in message


def test_a_directory_without_distlion_state_says_what_it_holds(tmp_path):
    (tmp_path / "optimizer.bin").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        load_state(str(tmp_path), _optimizer(), fix=FIX, missing=MISSING)
    message = str(error.value)
    assert "No DistLion optimizer state for rank 0" in message and "expected distlion_optimizer0_manifest.json" \
        in message
    assert "['optimizer.bin']" in message and message.endswith(MISSING)


def _truncate(path: str) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])


def _data_offset(path: str) -> int:
    """Where the first tensor record's data starts in a torch.save file (a zip)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def test_a_truncated_altered_or_foreign_file_is_named_as_such(tmp_path):
    optimizer = _stepped()
    path = save_state(optimizer.state_dict(), str(tmp_path / "a"), optimizer)
    original, offset = open(path, "rb").read(), _data_offset(path)
    _truncate(path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} holds {len(original) // 2} bytes, the manifest says "
                                                        f"{len(original)}: the file is truncated")):
        load_state(str(tmp_path / "a"), optimizer, fix=FIX, missing=MISSING)
    altered = bytearray(original)
    altered[offset] ^= 0xFF  # the first byte of a tensor's data
    open(path, "wb").write(bytes(altered))
    with pytest.raises(CheckpointError, match=re.escape(f"{path} does not match its checksum")):
        load_state(str(tmp_path / "a"), optimizer, fix=FIX, missing=MISSING)
    # another run's file under this save's name, with this save's size and checksum in the manifest
    other = save_state(_stepped(1).state_dict(), str(tmp_path / "b"), optimizer)
    os.replace(other, path)
    manifest = Manifest.read(str(tmp_path / "a"))
    with zipfile.ZipFile(path) as archive:
        manifest.files[0].bytes, manifest.files[0].crc32 = os.path.getsize(path), record_digest(archive)
    open(manifest_path(str(tmp_path / "a")), "w").write(manifest.to_json())
    with pytest.raises(CheckpointError, match="a file from another run or save was copied in"):
        load_state(str(tmp_path / "a"), optimizer, fix=FIX, missing=MISSING)
    os.remove(path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is missing, though")):
        load_state(str(tmp_path / "a"), optimizer, fix=FIX, missing=MISSING)


def test_files_are_loaded_weights_only(tmp_path):
    path = str(tmp_path / "state.pt")
    torch.save({"distlion": {}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="holds a pickled argparse.Namespace, which torch.load.weights_only=True"):
        load_file(path, kind="DistLion checkpoint")
    with torch.serialization.safe_globals([argparse.Namespace]):  # the caller's own allowlist applies
        assert load_file(path, kind="DistLion checkpoint")["args"].lr == 1.0
    with pytest.raises(FileNotFoundError):
        load_file(str(tmp_path / "missing.pt"), kind="DistLion checkpoint")


def test_fail_together_without_a_process_group_is_a_plain_call():
    assert fail_together(lambda: 7, source="here") == 7
    with pytest.raises(KeyError):
        fail_together(lambda: {}["x"], source="here")


# ------------------------------------------------------------------ real ranks

def _save_then_load(rank: int, world_size: int, directory: str, broken_rank: int, damage: str) -> dict:
    """Every rank saves; ``broken_rank``'s file is then removed or corrupted; every rank loads."""
    optimizer = _optimizer()
    path = save_state(optimizer.state_dict(), directory, optimizer)
    if rank == broken_rank:
        if damage == "missing":
            os.remove(path)
        elif damage == "truncated":
            _truncate(path)
        else:
            with open(path, "wb") as handle:
                handle.write(b"not a torch file")
    dist.barrier()
    outcome = {"error": None}
    try:
        fail_together(lambda: optimizer.load_state_dict(load_state(directory, optimizer, fix=FIX, missing=MISSING)),
                      source=directory)
    except Exception as error:  # what each rank raised, for the test to compare
        outcome = {"error": type(error).__name__, "message": str(error)}
    # Every rank returned from the load: a collective afterwards still pairs up.
    total = torch.tensor([1])
    dist.all_reduce(total)
    outcome["ranks_after"] = int(total)
    return outcome


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_a_load_failure_on_one_rank_fails_every_rank(tmp_path, damage):
    outcomes = run_ranks(_save_then_load, 3, str(tmp_path), 1, damage, timeout=90)
    assert [o["ranks_after"] for o in outcomes] == [3, 3, 3]
    broken = outcomes[1]
    assert broken["error"] == "CheckpointError", broken  # its own error (a ValueError)
    path = os.path.join(tmp_path, Manifest.read(str(tmp_path)).files[1].name)
    expected = {"missing": f"{path} is missing, though", "truncated": f"{path} holds ",
                "corrupt": f"{path} holds 16 bytes, the manifest says"}[damage]
    assert expected in broken["message"] and "Load a complete copy" in broken["message"], broken
    for rank in (0, 2):
        assert outcomes[rank]["error"] == "RuntimeError", outcomes[rank]
        assert f"rank(s) [1] could not load their checkpoint from {tmp_path}" in outcomes[rank]["message"]


def _load_own(rank: int, world_size: int, directory: str) -> int:
    optimizer = _optimizer()
    save_state(optimizer.state_dict(), directory, optimizer)
    dist.barrier()
    state = fail_together(lambda: load_state(directory, optimizer, fix=FIX, missing=MISSING), source=directory)
    return state["distlion"]["rank"]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_every_rank_loads_its_own_file(tmp_path):
    assert run_ranks(_load_own, 2, str(tmp_path), timeout=90) == [0, 1]
    save = Manifest.read(str(tmp_path)).save
    assert find_state_files(str(tmp_path)) == [StateFile(0, 0, 2, save), StateFile(0, 1, 2, save)]


def test_mismatch_names_ranks_per_node():
    assert describe_mismatch({"world_size": 4, "ranks_per_node": 2, "rank": 1},
                             {"world_size": 4, "ranks_per_node": 1, "rank": 1}) == \
        "ranks per node 2, but this run has ranks per node 1"


def _save_and_load_public(rank: int, world_size: int, directory: str, k: int = 2) -> tuple[bool, str]:
    """distlion.save after k steps, then distlion.load into a fresh DistLion: the same next k steps.

    Also returns the error of loading from an empty directory (on every rank)."""
    import distlion
    from simulation import BETAS, LR, WD, _grads, _params

    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, _grads(rank, step, "random")):
                p.grad = g
            opt.step()

    params = _params()
    opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD)
    run(params, opt, range(1, k + 1))
    saved = [p.detach().clone() for p in params]
    distlion.save(opt, directory)
    run(params, opt, range(k + 1, 2 * k + 1))
    resumed = [torch.nn.Parameter(t) for t in saved]
    opt2 = DistLion(resumed, lr=LR, betas=BETAS, weight_decay=WD)
    distlion.load(opt2, directory)
    run(resumed, opt2, range(k + 1, 2 * k + 1))
    same = all(torch.equal(a, b) for a, b in zip(params, resumed))
    try:
        distlion.load(opt2, os.path.join(directory, "empty"))
        error = ""
    except ValueError as caught:
        error = str(caught)
    return same, error


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_public_save_and_load_resume_exactly(tmp_path):
    for rank, (same, error) in enumerate(run_ranks(_save_and_load_public, 2, str(tmp_path), timeout=90)):
        assert same
        assert f"No DistLion optimizer state for rank {rank}" in error and "distlion.save(optimizer" in error
    save = Manifest.read(str(tmp_path)).save
    assert find_state_files(str(tmp_path)) == [StateFile(0, 0, 2, save), StateFile(0, 1, 2, save)]


def _stopped_while_loading(rank: int, world_size: int, directory: str, timeout: float) -> None:
    """Every rank saves; rank 1 then stops (SIGSTOP) while it reads its file in distlion.load, as a hung or
    frozen process would. Rank 0 must give up within DistLion(timeout=...), not the process group's 30 minutes."""
    import distlion

    optimizer = DistLion(torch.nn.Linear(4, 3).parameters(), lr=1e-2, timeout=timeout)
    distlion.save(optimizer, directory)
    dist.barrier()
    if rank == 1:
        read = torch.load

        def stop_then_read(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGSTOP)
            return read(*args, **kwargs)

        torch.load = stop_then_read
    distlion.load(optimizer, directory)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_rank_stopped_during_load_fails_the_others_within_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:  # not run_ranks' TimeoutError: rank 0 raised by itself
        run_ranks(_stopped_while_loading, 2, str(tmp_path), 3.0, timeout=60)
    assert time.monotonic() - start < 60  # the launch returned: the stopped rank was ended with it
    message = str(error.value)
    assert "rank 0 failed" in message and "CollectiveError" in message
    assert "the exchange of the ranks' checkpoint outcomes failed or did not finish within 3 s" in message
