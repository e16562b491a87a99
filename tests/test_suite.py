"""The convergence suite runs in its smoke mode and writes a JSON with real content for every task."""

import json
import math

import pytest

from benchmarks import suite
from test_benchmarks import load, run_benchmark


@pytest.mark.scripts
@pytest.mark.timeout(120)
def test_suite_smoke(tmp_path):
    result = run_benchmark("suite", tmp_path, timeout=110)
    record = load(tmp_path, "suite")
    assert record["settings"]["world_size"] == 2
    assert set(record["summary"]) == set(suite.TASKS)
    for task, table in record["summary"].items():
        assert set(table) == {"adamw", "distlion_majority"}, task
        assert record["chosen_lr"][task]["distlion_majority"] < record["chosen_lr"][task]["adamw"]  # Lion's smaller lr
        for row in table.values():
            assert math.isfinite(row["test_mean"]) and row["n"] == 1 and row["test_std"] == 0.0
        # 2 ranks exchange 1 bit per parameter (all_gather), plus padding and the flag; AdamW's ring sends 32.
        assert 1.0 <= table["distlion_majority"]["bits_per_param_step"] < 2.0
        assert table["adamw"]["bits_per_param_step"] == 32.0
        assert "gap_vs_adamw" in table["distlion_majority"]
    runs = record["runs"]
    assert len(runs) == len(suite.TASKS) * 2
    for run in runs:
        assert run["steps"] == 10 and math.isfinite(run["val"]) and math.isfinite(run["train_loss_last_10pct"])
        if run["optimizer"] == "distlion_majority":
            assert run["skipped_steps"] == 0 and run["compression"] > 16
    accuracy = [r["test"] for r in runs if r["task"] == "cnn"]
    assert all(0.0 <= a <= 100.0 for a in accuracy)
    assert (tmp_path / "suite-smoke.png").stat().st_size > 0
    assert "lm seed 0 distlion_majority" in result.stdout  # a progress line per run


def test_gap_is_positive_when_worse():
    loss, accuracy = suite.TASKS["lm"], suite.TASKS["cnn"]
    assert suite.gap(loss, 1.1, 1.0) == pytest.approx(10.0)  # 10% worse
    assert suite.gap(accuracy, 95.0, 96.5) == pytest.approx(1.5)  # 1.5 points worse
    assert suite.gap(accuracy, 97.0, 96.5) == pytest.approx(-0.5)


def test_lr_is_chosen_on_validation_and_nan_loses():
    task = suite.TASKS["tabular"]
    runs = [{"lr": 1e-3, "val": 0.5}, {"lr": 1e-3, "val": 0.7}, {"lr": 3e-3, "val": 0.4}, {"lr": 3e-3, "val": 0.9},
            {"lr": 1e-2, "val": float("nan")}, {"lr": 1e-2, "val": 0.1}]
    assert suite.choose(task, runs) == 1e-3  # best mean (0.6 < 0.65); a diverged seed disqualifies its lr
    assert suite.lr_grid(3e-3, "lion") == pytest.approx([2e-4, 6e-4, 1.8e-3])


def test_with_runs_adds_the_other_optimizers_of_the_same_tasks_and_seeds(tmp_path):
    def run(task, optimizer, seed):
        return {"task": task, "optimizer": optimizer, "seed": seed, "lr": 1e-3}

    earlier = tmp_path / "suite.json"
    earlier.write_text(json.dumps({"settings": {"lr_grid_multiples": [1.0]}, "runs": [
        run("lm", "adamw", 0), run("lm", "distlion_majority", 0), run("lm", "adamw", 1), run("cnn", "adamw", 0)]}))
    args = suite.parse_args(["--tasks", "lm", "--seeds", "0", "--lr_multiples", "1"])
    kept = suite.earlier_runs(str(earlier), args, [run("lm", "distlion_majority", 0)])
    assert kept == [run("lm", "adamw", 0)]  # not this run's optimizer, task or seed
    with pytest.raises(SystemExit, match="no runs for"):
        suite.earlier_runs(str(earlier), suite.parse_args(["--tasks", "tabular", "--lr_multiples", "1"]), [])
    with pytest.raises(SystemExit, match="lr grid"):
        suite.earlier_runs(str(earlier), suite.parse_args(["--tasks", "lm"]), [])
