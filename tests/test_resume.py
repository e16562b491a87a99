"""Resume on another topology, crash-safe saves and the offline tool, with real gloo ranks.

Every launch is bounded by a timeout (tests/multiprocess.py). The elastic tests save on one
topology, resume on another and check each rank's momentum against the rule computed here
from the saved files, then train on and check the replicas stay identical.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import distlion
from distlion import DistLion
from distlion.checkpoint import elastic
from distlion.checkpoint.files import CheckpointError, Manifest, state_file_name
from multiprocess import run_ranks

pytestmark = pytest.mark.multiprocess


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Linear(33, 5))


def _train(model, optimizer, rank: int, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        model(torch.randn(8, 7, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _momenta(optimizer: DistLion) -> dict[int, torch.Tensor]:
    return {index: entry["exp_avg"].clone() for index, entry in optimizer.state_dict()["state"].items()}


def _save_after(rank: int, world_size: int, directory: str, ranks_per_node: int, steps: int) -> dict:
    model = _model()
    optimizer = DistLion(model.parameters(), lr=1e-2, ranks_per_node=ranks_per_node)
    _train(model, optimizer, rank, steps)
    distlion.save(optimizer, directory)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    return _momenta(optimizer)


def _resume(rank: int, world_size: int, directory: str, ranks_per_node: int, rule: str, strict) -> dict:
    model = _model()
    model.load_state_dict(torch.load(os.path.join(directory, "model.pt")))
    optimizer = DistLion(model.parameters(), lr=1e-2, ranks_per_node=ranks_per_node, on_topology_change=rule)
    try:
        distlion.load(optimizer, directory, strict=strict)
    except ValueError as error:
        return {"error": str(error)}
    loaded = _momenta(optimizer)
    step = optimizer.steps_taken
    _train(model, optimizer, rank, 3, first=step)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(every, flat)
    return {"momenta": loaded, "step": step, "replicas_identical": all(torch.equal(every[0], x) for x in every)}


def _whole(saved: list[dict], plan, ranks_per_node: int) -> list[dict]:
    """Each saved voter's whole momenta, from the ranks' ``state`` entries."""
    voters = len(saved) // ranks_per_node
    return [elastic.whole_tensors([{"state": {i: {"exp_avg": m} for i, m in saved[v * ranks_per_node + j].items()}}
                                   for j in range(ranks_per_node)], plan, ranks_per_node) for v in range(voters)]


CHANGES = {"4 to 2": ((4, 1), (2, 1)), "2 to 4": ((2, 1), (4, 1)), "4x1 to 2x2": ((4, 1), (4, 2)),
           "2x2 to 3x1": ((4, 2), (3, 1))}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("change", CHANGES)
def test_a_resume_on_another_topology_maps_the_momenta_by_each_rule(tmp_path, change):
    (world, group), (new_world, new_group) = CHANGES[change]
    directory = str(tmp_path)
    saved = run_ranks(_save_after, world, directory, group, 4, timeout=120)
    from distlion.buckets import build_layout
    params = [{"params": list(_model().parameters())}]
    old_plan, new_plan = build_layout(params, world, 25), build_layout(params, new_world, 25)
    voters = _whole(saved, old_plan, group)
    for rule in elastic.RULES:
        resumed = run_ranks(_resume, new_world, directory, new_group, rule, None, timeout=120)
        for rank, outcome in enumerate(resumed):
            assert "error" not in outcome, outcome
            node, local = divmod(rank, new_group)
            chosen = elastic.sources(rule, node, world // group, new_world // new_group)
            expected = {i: sum(voters[v][i]["exp_avg"] for v in chosen) / len(chosen) for i in voters[0]}
            parts = elastic.split({i: {"exp_avg": t} for i, t in expected.items()}, new_plan, new_group, local)
            for index, momentum in outcome["momenta"].items():
                torch.testing.assert_close(momentum, parts[index]["exp_avg"], rtol=0, atol=1e-7)
            assert outcome["step"] == 4 and outcome["replicas_identical"], (rule, rank)


@pytest.mark.timeout(200)
def test_a_strict_resume_refuses_another_topology_on_every_rank(tmp_path):
    directory = str(tmp_path)
    run_ranks(_save_after, 2, directory, 1, 2, timeout=90)
    for rule, strict in (("mean", True), ("refuse", None)):
        outcomes = run_ranks(_resume, 3, directory, 1, rule, strict, timeout=90)
        for outcome in outcomes:
            assert "world size 2, but this run has world size 3" in outcome["error"], outcome
            assert "resume with 2 processes (ranks_per_node=1)" in outcome["error"]
    # strict=False maps even under "refuse"
    assert all("error" not in o for o in run_ranks(_resume, 3, directory, 1, "refuse", False, timeout=90))


# ------------------------------------------------------------------ saves that do not finish

def _save_on_rank_zero_only(rank: int, world_size: int, directory: str) -> str:
    """nanoGPT's habit: the save inside ``if master_process``. The others train on. Returns what each raised."""
    model = _model()
    optimizer = DistLion(model.parameters(), lr=1e-2, timeout=3.0)
    _train(model, optimizer, rank, 1)
    try:
        if rank == 0:
            distlion.save(optimizer, directory)
        _train(model, optimizer, rank, 1, first=1)
    except Exception as error:  # what each rank raised, for the test
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.timeout(120)
def test_a_save_called_on_rank_zero_only_fails_within_the_timeout(tmp_path):
    start = time.monotonic()
    saver, trainer = run_ranks(_save_on_rank_zero_only, 2, str(tmp_path), timeout=60)
    assert time.monotonic() - start < 60  # the launcher returned
    assert "waited 0:00:03 for the other ranks' files (1 of 2 missing)" in saver, saver
    assert "Every rank must save: call it on every rank, not inside `if rank == 0`" in saver
    assert trainer.startswith("CollectiveError"), trainer  # its next step's collective finds rank 0 gone
    assert not os.path.exists(os.path.join(tmp_path, "distlion_optimizer0_manifest.json"))


def _killed_while_saving(rank: int, world_size: int, directory: str, victim: int) -> None:
    """A complete save at step 2; at step 4 rank ``victim`` is SIGKILLed mid-save: rank 1 after writing its
    temporary file, before the rename; rank 0 after every file is in place, before the manifest."""
    from distlion.checkpoint import files

    model = _model()
    optimizer = DistLion(model.parameters(), lr=1e-2, timeout=3.0)
    _train(model, optimizer, rank, 2)
    distlion.save(optimizer, directory)
    torch.save(_momenta(optimizer), os.path.join(directory, f"expected{rank}.pt"))
    _train(model, optimizer, rank, 2, first=2)
    write = files.write_atomically

    def write_then_die(path, contents):
        if rank == victim and (rank == 0) == path.endswith("manifest.json"):
            temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
            with open(temporary, "wb") as handle:
                handle.write(b"the first bytes of a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, contents)

    files.write_atomically = write_then_die
    distlion.save(optimizer, directory)


def _load_and_report(rank: int, world_size: int, directory: str) -> dict:
    optimizer = DistLion(_model().parameters(), lr=1e-2)
    distlion.load(optimizer, directory)
    expected = torch.load(os.path.join(directory, f"expected{rank}.pt"))
    return {"step": optimizer.steps_taken,
            "same": all(torch.equal(expected[i], m) for i, m in _momenta(optimizer).items())}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("victim", [1, 0], ids=["rank 1 writing its file", "rank 0 before the manifest"])
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, victim):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="Every rank must save"):
        run_ranks(_killed_while_saving, 2, str(tmp_path), victim, timeout=60)
    assert time.monotonic() - start < 60
    leftovers = os.listdir(tmp_path)
    assert any(".tmp" in name or ".s4-" in name for name in leftovers), leftovers  # the unfinished save
    assert Manifest.read(str(tmp_path)).step == 2
    assert run_ranks(_load_and_report, 2, str(tmp_path), timeout=60) == [{"step": 2, "same": True}] * 2
    run_ranks(_save_again, 2, str(tmp_path), timeout=60)  # the next save clears what the killed one left
    names = sorted(name for name in os.listdir(tmp_path) if not name.startswith("expected"))
    save = Manifest.read(str(tmp_path)).save
    assert names == ["distlion_optimizer0_manifest.json"] + [state_file_name(r, 2, 0, save) for r in (0, 1)]


def _save_again(rank: int, world_size: int, directory: str) -> None:
    optimizer = DistLion(_model().parameters(), lr=1e-2)
    distlion.load(optimizer, directory)
    distlion.save(optimizer, directory)


def _mixed_steps(rank: int, world_size: int, directory: str) -> None:
    """Found on main: rank 1 was killed before its step-15 save; rank 0 saved. Files of two steps remain."""
    optimizer = DistLion(_model().parameters(), lr=1e-2, timeout=3.0)
    optimizer._step = 10
    distlion.save(optimizer, directory)
    optimizer._step = 15
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    distlion.save(optimizer, directory)


@pytest.mark.timeout(200)
def test_files_of_two_steps_never_load_as_one_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        run_ranks(_mixed_steps, 2, str(tmp_path), timeout=60)
    names = sorted(os.listdir(tmp_path))
    assert any(".s15-" in name for name in names) and any(".s10-" in name for name in names), names
    steps = run_ranks(_load_and_report_step, 2, str(tmp_path), timeout=60)
    assert steps == [10, 10]  # the step-10 save, whole: the manifest names its files only


def _load_and_report_step(rank: int, world_size: int, directory: str) -> int:
    optimizer = DistLion(_model().parameters(), lr=1e-2)
    distlion.load(optimizer, directory)
    return optimizer.steps_taken


# ------------------------------------------------------------------ the offline tool

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distlion.checkpoint", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(300)
def test_reshard_offline_equals_the_online_resume_and_info_verifies(tmp_path):
    source, out = str(tmp_path / "source"), str(tmp_path / "out")
    run_ranks(_save_after, 4, source, 1, 3, timeout=120)
    shown = _cli("info", source)
    assert shown.returncode == 0 and "step 3" in shown.stdout and "4 file(s)" in shown.stdout, shown
    assert shown.stdout.count("verified (") == 4
    made = _cli("reshard", source, out, "--world_size", "4", "--ranks_per_node", "2", "--rule", "mean_deviation")
    assert made.returncode == 0, made.stderr
    assert "re-split for 2 voter(s) of 2 rank(s) (world size 4) by the 'mean_deviation' rule" in made.stdout
    with open(os.path.join(source, "model.pt"), "rb") as handle, open(os.path.join(out, "model.pt"), "wb") as copy:
        copy.write(handle.read())
    offline = run_ranks(_resume, 4, out, 2, "refuse", True, timeout=120)  # same topology now: strict passes
    online = run_ranks(_resume, 4, source, 2, "mean_deviation", None, timeout=120)
    for mine, theirs in zip(offline, online):
        assert all(torch.equal(mine["momenta"][i], theirs["momenta"][i]) for i in theirs["momenta"])
    manifest_file = os.path.join(source, "distlion_optimizer0_manifest.json")
    data = json.load(open(manifest_file))
    data["files"][2]["crc32"] ^= 1
    json.dump(data, open(manifest_file, "w"))
    broken = _cli("info", source)
    assert broken.returncode == 1 and "rank2_of_4" in broken.stderr and "does not match its checksum" in broken.stderr


def test_seal_writes_the_manifest_of_one_complete_save_only(tmp_path):
    optimizer = DistLion(_model().parameters(), lr=1e-2)
    state = optimizer.state_dict()
    for rank, step in ((0, 15), (1, 10)):
        meta = {**state["distlion"], "rank": rank, "world_size": 2, "step": step}
        torch.save({**state, "distlion": meta}, tmp_path / state_file_name(rank, 2))
    refused = _cli("seal", str(tmp_path))
    assert refused.returncode == 1 and "files are of different steps ({0: 15, 1: 10}, by rank)" in refused.stderr
    os.remove(tmp_path / state_file_name(0, 2))
    refused = _cli("seal", str(tmp_path))
    assert refused.returncode == 1 and "lacks the files of rank(s) [0] of 2" in refused.stderr
    meta = {**state["distlion"], "rank": 0, "world_size": 2, "step": 10}
    torch.save({**state, "distlion": meta}, tmp_path / state_file_name(0, 2))
    sealed = _cli("seal", str(tmp_path))
    assert sealed.returncode == 0 and "sealed step 10 of 2 voter(s)" in sealed.stdout, sealed.stderr
    assert _cli("info", str(tmp_path)).returncode == 0
    with pytest.raises(CheckpointError, match=re.escape("exists already")):
        from distlion.checkpoint.__main__ import seal
        seal(str(tmp_path), 0)
