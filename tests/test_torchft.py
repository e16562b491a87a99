"""Fault-tolerant DistLion on torchft, with real processes: a Lighthouse, replica groups of one
gloo rank each (tests/torchft_job.py), SIGKILLs and a rejoin; every launch is bounded."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

torchft = pytest.importorskip("torchft", reason="torchft is not installed: pip install 'distlion[torchft]'")
pytestmark = pytest.mark.multiprocess
from benchmarks import harness  # noqa: E402

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchft_job.py")
STEPS = 16
LAUNCH_TIMEOUT_S = 150
# what a survivor prints when its quorum request to torchft's Manager server times out
TORCHFT_QUORUM_STALL = ("in _async_quorum", "Timeout expired")


def start(replica: int, address: str, out: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, JOB, "--replica", str(replica), "--lighthouse", address, "--store_port",
               str(harness.free_port()), "--steps", str(STEPS), "--out", out, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"a replica did not finish within {LAUNCH_TIMEOUT_S} s:\n{output[-3000:]}")
    return process.returncode, output


def records(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["records"]


def committed(path: str) -> dict[int, dict]:
    """Manager step -> the record of the step committed there."""
    return {r["step"]: r for r in records(path) if r["committed"]}


def test_a_killed_group_leaves_the_others_training_and_identical(tmp_path):
    kill_at = random.Random(0).randint(4, 9)
    outs = [str(tmp_path / f"replica{i}.json") for i in range(3)]
    with harness.torchft_lighthouse() as address:  # momenta averaged over the quorum every 4 steps and at its change
        processes = [start(i, address, outs[i], "--momentum_sync_every", "4",
                           *(["--kill_at", str(kill_at)] if i == 2 else [])) for i in range(3)]
        results = [finish(p) for p in processes]
    assert results[2][0] == -signal.SIGKILL, results[2][1][-2000:]
    for code, output in results[:2]:
        assert code == 0, output[-3000:]
    survivors = [committed(outs[0]), committed(outs[1])]
    assert sorted(survivors[0]) == list(range(STEPS)) == sorted(survivors[1])  # no restart: every step, once
    for step in range(STEPS):
        assert survivors[0][step]["params_after"] == survivors[1][step]["params_after"], step
    voters = [survivors[0][s]["voters"] for s in range(STEPS)]
    assert 3 in voters[:kill_at] and voters[-1] == 2, voters  # three voted, then two went on
    dead = committed(outs[2])
    for step in dead:  # what the killed group committed, the others committed alike
        assert dead[step]["params_after"] == survivors[0][step]["params_after"], step
    # a step with a momentum average (bf16, 2 bytes per coordinate) sends far more than a vote (1 bit)
    sent = [r["inter_node_bytes_sent"] for r in records(outs[0])]
    increments = [b - a for a, b in zip(sent, sent[1:])]
    averaged = [i for i in increments if i > 4 * min(increments)]
    assert len(averaged) >= STEPS // 4 - 1, increments  # every 4 steps, and at the quorum's change


def test_a_replacement_joins_with_a_live_peers_state_and_all_end_identical(tmp_path):
    kill_at = random.Random(1).randint(3, 6)
    outs = [str(tmp_path / f"replica{i}.json") for i in range(4)]
    with harness.torchft_lighthouse() as address:
        processes = [start(i, address, outs[i], "--end_with_voters", "3",
                           *(["--kill_at", str(kill_at)] if i == 2 else [])) for i in range(3)]
        assert finish(processes[2])[0] == -signal.SIGKILL
        processes[2] = start(3, address, outs[3], "--end_with_voters", "3")  # the replacement, a new process
        results = [finish(p) for p in processes]
    if any(code and all(text in output for text in TORCHFT_QUORUM_STALL) for code, output in results):
        # torchft's own: the survivors' Manager servers stop answering when the new group first asks for a
        # quorum, and a survivor's quorum request times out. Seen here in about half of the join runs, also
        # with torchft's OptimizerWrapper over SGD and no DistLion (docs/torchft.md, "Known limits").
        pytest.xfail("torchft's quorum stalled when the replacement joined (torchft, not DistLion)")
    for code, output in results:
        assert code == 0, output[-3000:]
    runs = [committed(outs[i]) for i in (0, 1, 3)]
    joined = min(runs[2])
    assert joined >= kill_at, joined  # it joined at the live step, without replaying any
    last = max(runs[0])
    assert [max(run) for run in runs] == [last] * 3 and last >= STEPS - 1
    final = [run[last] for run in runs]
    assert len({r["params_after"] for r in final}) == 1  # bit-identical at the end
    assert len({r["steps_taken"] for r in final}) == 1
    for step in range(joined, last + 1):  # and from its first step on
        assert len({run[step]["params_after"] for run in runs}) == 1, step
    assert final[0]["voters"] == 3


def test_a_step_that_fails_mid_vote_is_applied_nowhere(tmp_path):
    fail_at = random.Random(2).randint(4, 9)
    outs = [str(tmp_path / f"replica{i}.json") for i in range(3)]
    with harness.torchft_lighthouse() as address:
        processes = [start(i, address, outs[i], *(["--kill_in_exchange_at", str(fail_at)] if i == 2 else []))
                     for i in range(3)]
        results = [finish(p) for p in processes]
    assert results[2][0] == -signal.SIGKILL
    for code, output in results[:2]:
        assert code == 0, output[-3000:]
    for out in outs[:2]:
        attempts = [r for r in records(out) if r["step"] == fail_at]
        failed, retried = attempts[0], attempts[-1]
        assert not failed["committed"] and len(attempts) >= 2, attempts
        assert failed["params_after"] == failed["params_before"]  # nothing applied ...
        assert failed["momentum_after"] == failed["momentum_before"]  # ... nothing accumulated
        assert retried["committed"] and retried["params_before"] == failed["params_before"]
    assert committed(outs[0])[STEPS - 1]["params_after"] == committed(outs[1])[STEPS - 1]["params_after"]


def test_the_vote_stays_one_bit_per_voter(tmp_path):
    outs = [str(tmp_path / f"replica{i}.json") for i in range(3)]
    with harness.torchft_lighthouse(min_replicas=3) as address:
        results = [finish(p) for p in [start(i, address, outs[i]) for i in range(3)]]
    for code, output in results:
        assert code == 0, output[-3000:]
    with open(outs[0]) as f:
        numel = json.load(f)["num_parameters"]
    rows = committed(outs[0])
    # a step of 3 voters: each sends its packed signs (numel/8 bytes, padded to the bucket, + 8 header bytes)
    # to the 2 others; nothing else goes between the groups while the quorum stays the same
    sent = rows[STEPS - 1]["inter_node_bytes_sent"] - rows[STEPS - 2]["inter_node_bytes_sent"]
    assert rows[STEPS - 1]["voters"] == 3
    assert 2 * numel / 8 <= sent <= 2 * (numel / 8 + 64 + 8), (sent, numel)


def test_the_manager_must_use_a_synchronous_quorum():
    from distlion.torchft import FaultTolerantDistLion

    class AsyncManager:
        _use_async_quorum = True

    with pytest.raises(ValueError, match="use_async_quorum=False"):
        FaultTolerantDistLion(AsyncManager(), torch_model())


def torch_model():
    import torch.nn as nn
    return nn.Linear(2, 2)


def test_a_quorum_refuses_the_average_vote():
    import torch.nn as nn
    from distlion import DistLion

    class Quorum:
        def exchange(self, *args):
            raise AssertionError

        def commit(self):
            return True

    with pytest.raises(ValueError, match="vote='average' with a quorum is not supported"):
        DistLion(nn.Linear(2, 2).parameters(), vote="average", quorum=Quorum())
