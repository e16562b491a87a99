"""The memory benchmark's smoke runs (also over FSDP2), netlink's FSDP2 pair (needs root, else a clean
skip) and the node-level scaling model: byte counts, not times."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import netlink, scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDEAL = {"alpha_s": 0.0, "bytes_factor": {s: 1.0 for s in scaling.SCHEMES}, "efficiency": 1.0, "wire_overhead": 1.0}


@pytest.mark.scripts
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
    # parameters and gradients held per rank: whole (replicated), in the model's dtype
    assert rows["distlion_g2", "fp32"]["params_bytes_per_param"] == pytest.approx(4, rel=0.02)
    assert rows["adamw_ddp", "bf16"]["grads_bytes_per_param"] == pytest.approx(2, rel=0.02)


FSDP_SETUPS = ("fsdp2_adamw_g2", "fsdp2_distlion_g2")  # replicated DistLion: test_memory_smoke


@pytest.mark.scripts
@pytest.mark.timeout(90)
def test_memory_fsdp_smoke(tmp_path):
    """N = 4 as 2 nodes x 2: FSDP2 + AdamW (hybrid) and FSDP2 + DistLion hold ~1/2 of the parameters and
    gradients per rank, their optimizers the state of the local shards."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--smoke", "--world_size", "4", "--setups",
                             *FSDP_SETUPS, "--tag", "fsdp", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=80, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "memory-fsdp-smoke.json").read_text())
    assert record["world_size"] == 4
    rows = {(r["setup"], r["dtype"]): r for r in record["rows"]}
    assert set(rows) == {(name, dtype) for name in FSDP_SETUPS for dtype in ("fp32", "bf16")}
    for dtype in ("fp32", "bf16"):
        hybrid, lion = rows["fsdp2_adamw_g2", dtype], rows["fsdp2_distlion_g2", dtype]
        # fp32 shards of half the model (FSDP pads each parameter's rows to a multiple of 2), also under
        # bf16 mixed precision
        for row in (hybrid, lion):
            assert row["params_bytes_per_param"] == pytest.approx(2, rel=0.02)
            assert row["grads_bytes_per_param"] == pytest.approx(2, rel=0.02)
        kinds = hybrid["bytes_per_param_by_kind"]
        assert kinds["exp_avg"] + kinds["exp_avg_sq"] == pytest.approx(4, rel=0.02)  # AdamW's moments of the shards
        assert lion["bytes_per_param_by_kind"]["momentum"] == pytest.approx(2, rel=0.02)
        assert "node_grads" not in lion["bytes_per_param_by_kind"]  # FSDP's reduce-scatter is the node's part
        assert lion["held_bytes_per_param"] == pytest.approx(
            lion["params_bytes_per_param"] + lion["grads_bytes_per_param"] + lion["optimizer_bytes_per_param"],
            rel=0.01)
        check = record["target_vs_fsdp2_adamw"][dtype]
        assert set(check) == {"fsdp2_distlion_g2"}
        assert check["fsdp2_distlion_g2"]["baseline"] == "fsdp2_adamw_g2"
    assert "against fsdp2_adamw_g2" in result.stdout


@pytest.mark.scripts
@pytest.mark.timeout(120)
def test_netlink_fsdp_smoke_or_clean_skip(tmp_path):
    """2 namespaces x 2 ranks: FSDP2 hybrid + AdamW's all-reduce and FSDP2 + DistLion's vote cross the veth
    link, FSDP's reduce-scatters and all-gathers stay on each namespace's loopback."""
    reason = netlink.cannot_run()
    result = subprocess.run([sys.executable, "-m", "benchmarks.netlink", "--smoke", "--ranks_per_node", "2",
                             "--fsdp", "--out", str(tmp_path)], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if reason is not None:
        assert netlink.SKIP_PREFIX in result.stdout and reason in result.stdout
        assert not list(tmp_path.iterdir())
        return
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dl-bench-" not in leftovers  # it removed what it created
    record = json.loads((tmp_path / "netlink-fsdp-2x2-smoke.json").read_text())
    (run,) = record["runs"]
    assert (run["world_size"], run["nodes"], run["ranks_per_node"]) == (4, 2, 2) and record["fsdp"] is True
    hybrid, lion = run["fsdp_hybrid_adamw"], run["fsdp_distlion"]
    assert lion["ranks_per_node"] == 1  # FSDP did the node's part; the replicate dim votes
    for row, counted in ((hybrid, hybrid["bytes_sent_per_step"]), (lion, lion["inter_node_bytes_sent_per_step"])):
        # the node's two ranks' inter-node payload crosses the veth; intra-node traffic stays on loopback
        assert 2 * counted <= row["wire_tx_bytes_per_step"] < row["loopback_tx_bytes_per_step"]
    assert run["ratios"]["counted_inter_node_bytes_hybrid_adamw_over_distlion"] > 30
    assert set(run["targets"]) == {"wire_bytes_hybrid_adamw_over_distlion >= 30"}


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


@pytest.mark.scripts
@pytest.mark.timeout(60)
def test_scaling_nodes_smoke(tmp_path):
    scaling.main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "scaling-nodes-smoke.json").read_text())
    assert record["gpus_per_node"] == 8 and record["rails"] == 8
    assert {r["nodes"] for r in record["rows"]} == {2, 4}
    assert min(record["fp32_over_nodes_bytes_by_nodes"].values()) >= scaling.TARGET_NODES_OVER_FP32
