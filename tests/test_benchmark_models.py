"""The memory benchmark's smoke run and the node-level scaling model: byte counts, not times."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDEAL = {"alpha_s": 0.0, "bytes_factor": {s: 1.0 for s in scaling.SCHEMES}, "efficiency": 1.0, "wire_overhead": 1.0}


@pytest.mark.timeout(150)
def test_memory_smoke(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=140, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "memory-smoke.json").read_text())
    assert record["smoke"] is True and record["world_size"] == 2
    rows = {(r["setup"], r["dtype"]): r for r in record["rows"]}
    assert {name for name, _ in rows} == {"distlion_g1", "distlion_g1_ema", "distlion_g2", "distlion_g2_ema",
                                          "adamw_ddp", "adamw_zero1_ddp"}
    for row in rows.values():
        assert row["optimizer_bytes_per_param"] > 0 and row["peak_rss_mib"] > 0
        assert row["state_bytes_per_param"] <= row["optimizer_bytes_per_param"]
    kinds = {key: row["bytes_per_param_by_kind"] for key, row in rows.items()}
    # AdamW: two fp32 moments (plus a 4-byte step per tensor); ZeRO-1 over 2 ranks holds about half.
    assert kinds["adamw_ddp", "fp32"]["exp_avg"] + kinds["adamw_ddp", "fp32"]["exp_avg_sq"] == pytest.approx(8)
    assert rows["adamw_ddp", "fp32"]["state_bytes_per_param"] == pytest.approx(8, rel=0.01)
    assert rows["adamw_zero1_ddp", "fp32"]["state_bytes_per_param"] < 0.7 * 8
    # DistLion: fp32 momentum (buckets are padded); a node of 2 ranks holds half of it per rank, plus the
    # whole bucket's fp32 gradient for the reduce-scatter.
    assert kinds["distlion_g1", "fp32"]["momentum"] == pytest.approx(4, rel=0.02)
    assert kinds["distlion_g2", "fp32"]["momentum"] == pytest.approx(kinds["distlion_g1", "fp32"]["momentum"] / 2)
    assert kinds["distlion_g2", "fp32"]["node_grads"] == pytest.approx(4, rel=0.02)
    assert kinds["distlion_g2_ema", "fp32"]["vote_ema"] == pytest.approx(2, rel=0.02)
    assert kinds["distlion_g2", "bf16"]["master"] == pytest.approx(2, rel=0.02)
    assert "node_grads" not in kinds["distlion_g1", "fp32"]


def test_node_model_inter_node_bytes():
    d = 1e9
    for m in scaling.NODE_COUNTS:
        cluster = scaling.Cluster(m, 8, 8, 100, 450)
        n = 8 * m
        fp32 = scaling.inter_node_bytes("ddp_fp32", d, cluster)
        assert fp32 == pytest.approx(2 * (n - 1) / n * 4 * d)
        assert scaling.inter_node_bytes("distlion_nodes", d, cluster) == pytest.approx(2 * (m - 1) / m * d / 8)
        assert scaling.inter_node_bytes("distlion_flat", d, cluster) == pytest.approx(
            8 * (m - 1) / m * d / 8 + (n - 1) / n * d / 8)
        assert fp32 / scaling.inter_node_bytes("distlion_nodes", d, cluster) >= 32
    assert scaling.inter_node_bytes("distlion_nodes", d, scaling.Cluster(1, 8, 8, 100, 450)) == 0


def test_node_model_one_gpu_per_node_is_the_flat_model():
    cluster = scaling.Cluster(64, 1, 1, 100, 450)
    flat = scaling.comm_time("distlion_two_phase", 1e9, 64, 100, IDEAL)
    assert scaling.inter_node_bytes("distlion_flat", 1e9, cluster) == pytest.approx(
        scaling.ideal_bytes("distlion_two_phase", 1e9, 64))
    assert scaling.node_comm_time("distlion_nodes", 1e9, cluster, IDEAL) == pytest.approx(flat)
    assert scaling.node_comm_time("ddp_fp32", 1e9, cluster, IDEAL) == pytest.approx(
        scaling.comm_time("allreduce_fp32", 1e9, 64, 100, IDEAL))


def test_cluster_names_every_bad_number():
    with pytest.raises(ValueError, match="nodes=0.*gbits=-1"):
        scaling.Cluster(0, 8, 8, -1, 450)


@pytest.mark.timeout(60)
def test_scaling_nodes_smoke(tmp_path):
    scaling.main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "scaling-nodes-smoke.json").read_text())
    assert record["gpus_per_node"] == 8 and record["rails"] == 8
    assert {r["nodes"] for r in record["rows"]} == {2, 4}
    assert min(record["fp32_over_nodes_bytes_by_nodes"].values()) >= scaling.TARGET_NODES_OVER_FP32
