"""The demo end to end at a reduced size (--smoke): 4 gloo workers, DistLion, AdamW + DDP, DistLion 2 x 2."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_demo_smoke_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "launch.demo", "--smoke", "--ranks_per_node", "2", "--out",
                             str(out)],
                            capture_output=True, text=True, timeout=290, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for column in ("final val loss", "sent/worker/step", "total sent", "AdamW/this bytes", "time/step"):
        assert column in result.stdout
    assert "DistLion (majority)" in result.stdout and "AdamW + DDP" in result.stdout

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10_000
    runs, rows = report["runs"], report["comparison"]
    assert set(runs) == {"distlion", "adamw", "distlion_nodes"}
    for name, metrics in runs.items():
        assert metrics["world_size"] == 4
        assert metrics["parameters_identical"], (name, metrics["parameter_digests"])
        assert metrics["history"][-1]["val_loss"] < metrics["history"][0]["val_loss"]
    assert runs["distlion"]["exchange"] == "two_phase"  # auto with 4 ranks
    # Same model, seed, data and steps: only the optimizer differs.
    for key in ("num_parameters", "tokens_per_step"):
        assert runs["distlion"][key] == runs["adamw"][key]
    assert runs["distlion"]["config"]["steps"] == runs["adamw"]["config"]["steps"]
    # Measured bytes: even a tiny model's padding and flags keep DistLion far below fp32 all-reduce.
    assert rows["distlion"]["bytes_ratio_adamw_over_this"] > 20
    assert rows["distlion"]["total_bytes_sent_all_workers"] == runs["distlion"]["bytes_sent"] * 4
    assert rows["distlion"]["bytes_counted"] == rows["adamw"]["bytes_counted"] == "all bytes sent"
    # The 2 x 2 run: same task, reported by the bytes its vote sends between the nodes.
    nodes, stats = rows["distlion_nodes"], runs["distlion_nodes"]["comm_stats"]
    assert nodes["label"] == "DistLion (majority), 2 nodes x 2" and "DistLion (majority), 2 nodes x 2" in result.stdout
    assert stats["ranks_per_node"] == 2 and runs["distlion"]["comm_stats"]["ranks_per_node"] == 1
    assert nodes["bytes_counted"].startswith("inter-node bytes only") and "inter-node bytes only" in result.stdout
    assert nodes["bytes_sent_per_worker_per_step"] == stats["inter_node_bytes_sent"] / stats["steps"]
    assert runs["distlion_nodes"]["history"][-1]["inter_node_bytes_sent"] == stats["inter_node_bytes_sent"]
    assert nodes["bytes_ratio_adamw_over_this"] > rows["distlion"]["bytes_ratio_adamw_over_this"]
    assert runs["distlion_nodes"]["parameters_identical"]
    assert report["demo_wall_time_s"] > 0 and report["smoke"] is True
    assert "hostname" not in json.dumps(report["machine"]).lower()


@pytest.mark.timeout(30)
def test_demo_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "launch.demo", "--workers", "0"],
                            capture_output=True, text=True, timeout=25, cwd=REPO)
    assert result.returncode == 2 and "--workers 0: use at least 1" in result.stderr
    result = subprocess.run([sys.executable, "-m", "launch.demo", "--ranks_per_node", "3"],
                            capture_output=True, text=True, timeout=25, cwd=REPO)
    assert result.returncode == 2 and "--ranks_per_node 3: use a divisor of --workers 4" in result.stderr
