"""The stall study (``benchmarks.stall``): its diagnostics by hand, and its smoke run end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import stall

REPO = Path(__file__).resolve().parent.parent


def test_momentum_spread_by_hand():
    # coordinate 0: 1 and 3 (std 1), coordinate 1: 2 and -2 (std 2); mean |m| = 2
    spread, cosine = stall.momentum_spread(torch.tensor([[1.0, 2.0], [3.0, -2.0]]))
    assert spread == pytest.approx(1.5 / 2.0)
    assert cosine == pytest.approx(-1 / math.sqrt(5 * 13))
    same, parallel = stall.momentum_spread(torch.tensor([[1.0, -2.0], [1.0, -2.0], [1.0, -2.0]]))
    assert same == 0.0 and parallel == pytest.approx(1.0)
    assert stall.momentum_spread(torch.zeros(4, 3)) == (None, None)  # step 1: no momentum yet


def test_vote_and_its_statistics_by_hand():
    signs = torch.tensor([[1, 1, 1, -1], [1, 1, 1, -1], [1, 1, -1, -1], [1, -1, -1, -1]])  # sums 4, 2, 0, -4
    voted = stall.majority_vote(signs, casting=2)
    assert voted.tolist() == [1, 1, -1, -1]  # the tie in coordinate 2 goes to voter 2
    assert stall.majority_vote(signs, casting=0).tolist() == [1, 1, 1, -1]
    before_previous, previous = torch.tensor([1, -1, 1, -1]), torch.tensor([-1, 1, 1, -1])
    stats = stall.vote_stats(signs, voted, [before_previous, previous], torch.tensor([False, False, True, True]))
    assert stats["tie"] == 0.25 and stats["near_tie"] == 0.5 and stats["tie_repeat"] == 0.25
    assert stats["flip"] == 0.5  # coordinates 0 and 2
    assert stats["flip2"] == 0.25  # coordinate 0 flipped at both steps, coordinate 2 only at the last
    assert stats["drift10"] is None  # fewer than 10 steps
    first = stall.vote_stats(signs, voted, [], None)
    assert first["flip"] is None and first["tie_repeat"] is None
    # 10 steps: coordinate 0 always +, coordinate 1 alternating, coordinates 2 and 3 always -
    history = [torch.tensor([1, (-1) ** k, -1, -1]) for k in range(9)]
    steady = stall.vote_stats(signs, torch.tensor([1, -1, -1, -1]), history, None)
    assert steady["drift10"] == pytest.approx(0.75) and steady["flip"] == 0.25 and steady["flip2"] == 0.25


@pytest.mark.scripts
@pytest.mark.timeout(150)
def test_stall_smoke(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.stall", "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=140, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "stall-smoke.json").read_text())
    assert record["smoke"] is True and record["settings"]["world_size"] == 4
    runs = {r["setting"]: r for r in record["runs"]}
    assert set(runs) == set(stall.DEFAULT_SETTINGS)
    fractions = ("tie", "near_tie", "tie_repeat", "flip", "flip2", "drift10", "vs_mean", "synced")
    for name, run in runs.items():
        # the voted sign read from the parameters is the gathered signs' vote, ties included
        assert run["vote_mismatch"] == 0 and run["zero_direction"] == 0
        assert run["steps"] == 34 and math.isfinite(run["test"]) and run["val_curve"][-1][0] == 34
        for field in stall.FIELDS:
            values = [v for v in run["diagnostics"][field] if v is not None]
            assert len(run["diagnostics"][field]) == 4 and values, (name, field)  # 34 steps in bins of 10
            if field in fractions:
                assert all(0.0 <= v <= 1.0 for v in values), (name, field, values)
            assert run["windows"]["plateau"][field] is not None
        assert all(v >= 0 for v in run["diagnostics"]["spread"] if v is not None)
        assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in run["diagnostics"]["cosine"] if v is not None)
    # global Lion: one momentum, the same on every rank; the voters' momenta differ
    assert runs["lion_global"]["windows"]["plateau"]["spread"] == 0.0
    assert runs["lion_global"]["windows"]["plateau"]["cosine"] == pytest.approx(1.0)
    assert runs["majority"]["windows"]["plateau"]["spread"] > 0.05
    assert max(runs["majority"]["diagnostics"]["tie"]) > 0  # the tie rule was exercised
    for run in runs.values():
        assert run["windows"]["plateau"]["near_tie"] >= run["windows"]["plateau"]["tie"]
    # syncs at the steps the settings say, and their bytes on top of the vote's
    assert (runs["majority"]["syncs"], runs["msync32"]["syncs"], runs["msync16"]["syncs"]) == (0, 1, 2)
    assert runs["tied_sync"]["syncs"] == 34 // record["settings"]["tied_sync"]["every"]
    # tie_sync: its first sync at step min_gap (8 in the smoke run: one of the first 10 steps), then on many ties
    assert record["settings"]["tie_sync"]["min_gap"] == 8 and 1 <= runs["tie_sync"]["syncs"] <= 34 // 8
    assert runs["tie_sync"]["diagnostics"]["synced"][0] == 0.1
    assert runs["majority"]["sync_bits_per_param_step"] == 0
    assert runs["msync16"]["sync_bits_per_param_step"] == pytest.approx(2 * runs["msync32"]["sync_bits_per_param_step"])
    assert runs["msync32"]["bits_per_param_step"] == pytest.approx(
        runs["majority"]["bits_per_param_step"] + runs["msync32"]["sync_bits_per_param_step"])
    assert runs["lion_global"]["bits_per_param_step"] == 48.0  # fp32 ring all-reduce at N = 4
    assert set(record["summary"]) == set(stall.DEFAULT_SETTINGS) and "lr chosen on validation" in result.stdout

