"""Every benchmark runs in its smoke mode (tiny sizes) and writes its JSON: they cannot rot.

No assertion on times; the byte counts are exact and are checked.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import lion_gap, netlink, scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(name: str, out, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python -m benchmarks.NAME --smoke --out OUT ARGS`` from the repository root."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out), *args],
                            capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(out, name: str) -> dict:
    record = json.loads((out / f"{name}-smoke.json").read_text())
    assert record["smoke"] is True and record["machine"]["logical_cores"] >= 1
    return record


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_comm_volume_smoke(tmp_path):
    result = run_benchmark("comm_volume", tmp_path, timeout=170)
    rows = {r["config"]: r for r in load(tmp_path, "comm_volume")["rows"]}
    assert set(rows) == {"distlion_two_phase_majority", "distlion_all_gather_majority", "distlion_two_phase_average",
                         "distlion_all_gather_average", "distlion_sync_every_step", "distlion_defaults_k32",
                         "ddp_fp32", "ddp_bf16"}
    # the defaults: the vote plus a bf16 momentum all-reduce every 32 steps, within 1% of its ideal
    defaults = rows["distlion_defaults_k32"]
    assert defaults["ideal_bytes"] <= defaults["bytes_per_step_per_rank"] <= 1.01 * defaults["ideal_bytes"]
    assert 20 < defaults["ratio_ddp_fp32_over_this"] < 22
    assert rows["ddp_fp32"]["bytes_per_step_per_rank"] == rows["ddp_fp32"]["ideal_bytes"]
    assert rows["ddp_bf16"]["ratio_ddp_fp32_over_this"] == 2.0
    for name in ("distlion_two_phase_majority", "distlion_all_gather_majority"):
        # Measured is the ideal plus padding and the 8-byte flag: within 1% at 22k parameters.
        assert rows[name]["ideal_bytes"] <= rows[name]["bytes_per_step_per_rank"] <= 1.01 * rows[name]["ideal_bytes"]
        assert rows[name]["ratio_ddp_fp32_over_this"] > 30
    assert "DDP fp32 / this" in result.stdout


@pytest.mark.scripts
@pytest.mark.timeout(240)
def test_fault_tolerance_smoke(tmp_path):
    pytest.importorskip("torchft", reason="torchft is not installed: pip install 'distlion[torchft]'")
    run_benchmark("fault_tolerance", tmp_path, timeout=230)
    record = load(tmp_path, "fault_tolerance")
    assert all(r["torchft_step_s"] > 0 and r["plain_step_s"] > 0 for r in record["overhead"]["rounds"])
    failure = record["failure"]
    assert failure["voters_after"] == [2, 2]  # the survivors went on without the killed group
    assert all(lost >= 0 for lost in failure["steps_lost"]) and failure["restart_s"] > 0


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_step_time_smoke(tmp_path):
    result = run_benchmark("step_time", tmp_path, timeout=170)
    record = load(tmp_path, "step_time-tiny")
    assert set(record["timings"]) == {"distlion", "distlion_scaled", "adamw_ddp", "adamw_ddp_phase"}
    for timing in record["timings"].values():
        assert timing["step_s"] >= timing["phase_s"] > 0
    ratios = record["ratios"]
    assert ratios["bytes_adamw_over_distlion"] > 30 and ratios["phase_adamw_over_distlion"] > 0
    assert record["timings"]["distlion_scaled"]["bytes_sent_per_step"] == record["timings"]["distlion"][
        "bytes_sent_per_step"]  # the scaled step sends nothing more
    assert "AdamW + DDP / DistLion" in result.stdout


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_step_breakdown_smoke(tmp_path):
    result = run_benchmark("step_breakdown", tmp_path, timeout=170)
    record = load(tmp_path, "step_breakdown-tiny")
    lion, adamw = record["stages_ms"]["distlion"], record["stages_ms"]["adamw_ddp_phase"]
    # Two ranks: the all-gather exchange; every stage of the real step was timed.
    assert {"pack_grads_and_momentum", "all_gather_single", "majority_vote", "apply",
            "rest", "total"} <= set(lion)
    assert {"all_reduce", "rest", "total"} == set(adamw)
    assert "distlion:" in result.stdout and "adamw_ddp_phase:" in result.stdout


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_kernels_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=170, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["kernels"]
    timed = {(r["kernel"], r["impl"]) for r in rows}
    for impl in ("cpu_native", "torch_fast", "reference"):
        assert {("apply fp32 (majority)", impl), ("apply fp32 (scaled, majority)", impl)} <= timed
    assert all(r["seconds"] > 0 for r in rows)


@pytest.mark.scripts
@pytest.mark.timeout(60)
def test_scaling_smoke(tmp_path):
    run_benchmark("scaling", tmp_path, timeout=50)
    record = load(tmp_path, "scaling")
    assert {r["world_size"] for r in record["rows"]} == {8, 16}
    assert (tmp_path / "scaling-smoke.png").exists()


@pytest.mark.timeout(30)
def test_scaling_model_ideal_ratios():
    ideal = {"alpha_s": 0.0, "bytes_factor": {s: 1.0 for s in scaling.SCHEMES}, "efficiency": 1.0,
             "wire_overhead": 1.0}
    fp32 = scaling.comm_time("allreduce_fp32", 1e9, 64, 100, ideal)
    assert fp32 == pytest.approx(2 * 63 / 64 * 4e9 * 8 / 100e9)
    assert fp32 / scaling.comm_time("distlion_two_phase", 1e9, 64, 100, ideal) == pytest.approx(32)
    assert scaling.comm_time("distlion_all_gather", 1e9, 64, 100, ideal) == pytest.approx(63 * 1e9 / 8 * 8 / 100e9)


@pytest.mark.scripts
@pytest.mark.timeout(240)
def test_convergence_smoke(tmp_path):
    # Two of the four variants keep CI short; global Lion runs in test_train.py.
    result = run_benchmark("convergence", tmp_path, "--variants", "distlion_average", "adamw", timeout=230)
    record = load(tmp_path, "convergence")
    assert set(record["summary"]) == {"distlion_average", "adamw"}
    for variant, summary in record["summary"].items():
        assert summary["n"] == 1 and summary["std"] == 0.0
    # each optimizer ran with its own defaults: DistLion the scaled step, AdamW without it
    distlion, adamw = record["settings"]["distlion_average"], record["settings"]["adamw"]
    assert distlion["vote_ema_beta"] == 0.9 and adamw["vote_ema_beta"] is None
    assert distlion["weight_decay"] > adamw["weight_decay"] and distlion["lr"] != adamw["lr"]
    assert "vs AdamW" in result.stdout


@pytest.mark.scripts
@pytest.mark.timeout(90)
def test_elastic_smoke(tmp_path):
    # tabular, seed 0, 4x1 -> 2x2, 4 steps: two launches of 4 ranks
    result = run_benchmark("elastic", tmp_path, timeout=80)
    record = load(tmp_path, "elastic")
    rules = ("same", "mean", "modulo", "mean_deviation")
    assert record["settings"]["changes"] == {"4x1to2x2": {"label": "4x1→2x2", "source": "4x1", "target": "2x2"}}
    assert record["settings"]["rules"] == list(rules[1:]) and record["settings"]["resume_at"] == 2
    runs = record["runs"]
    assert sorted(str((r["kind"], r["topology"], r["rule"])) for r in runs) == sorted(map(str, [
        ("uninterrupted", "4x1", None), ("uninterrupted", "2x2", None), ("first_half", "4x1", None),
        ("resume", "4x1", "same")] + [("resume", "2x2", rule) for rule in rules[1:]]))
    assert all(r["steps_taken"] == (2 if r["kind"] == "first_half" else 4) for r in runs)
    # the resume on the saved topology is the uninterrupted run, bitwise
    (check,) = record["same_checks"]
    assert check["exact"] and check["weights_digest"] and check["momentum_digests"]
    entry = record["summary"]["tabular"]["4x1to2x2"]
    assert set(entry["rules"]) == set(rules)
    assert entry["rules"]["same"]["exact"] and entry["rules"]["same"]["gap_vs_source"] == {"0": 0.0}
    assert set(entry["rules"]["mean"]) >= {"mean_gap_vs_source", "gap_vs_source", "mean_gap_vs_target",
                                           "within_source_spread", "within_target_spread"}
    assert set(record["spreads"]["tabular"]) == {"4x1", "2x2"}
    assert record["spreads"]["tabular"]["4x1"]["std"] == 0.0  # one seed
    assert len(record["gaps"]) == len(rules) and set(record["rules_by_mean_abs_gap"]["tabular"]) == set(rules[1:])
    # each rule maps the momenta its own way: the resumed momenta differ
    resumed = [tuple(r["momentum_digests"]) for r in runs if r["kind"] == "resume" and r["rule"] != "same"]
    assert len(set(resumed)) == 3
    assert "exact" in result.stdout and "mean_deviation" in result.stdout


@pytest.mark.scripts
@pytest.mark.timeout(240)
def test_checkpoint_cost_smoke(tmp_path):
    result = run_benchmark("checkpoint_cost", tmp_path, timeout=230)
    record = load(tmp_path, "checkpoint_cost")
    save = record["save_n4"]
    assert len(save["plain_s"]) == len(save["distlion_s"]) == len(save["unsynced_s"]) == record["rounds"] == 2
    assert save["ratio"] == save["distlion_median_s"] / save["plain_median_s"] > 0
    assert set(record["resume"]) == {"same_n4", "4_to_2", "same_n2", "2_to_4"}
    assert record["resume"]["4_to_2"]["ratio_to_same_n2"] > 0 and record["resume"]["2_to_4"]["ratio_to_same_n4"] > 0
    assert "ratio to the same-topology resume" in result.stdout


def run_netlink_smoke(out, name: str, *args: str) -> dict | None:
    """Run netlink's smoke mode; check that it removed its namespaces, or skipped saying why and wrote
    nothing; return its record (None when it skipped)."""
    reason = netlink.cannot_run()
    result = run_benchmark("netlink", out, *args, timeout=170)
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout \
        if reason is None else ""
    assert "dl-bench-" not in leftovers  # it removed what it created
    if reason is not None:
        assert netlink.SKIP_PREFIX in result.stdout and reason in result.stdout
        assert not list(out.iterdir())
        return None
    return load(out, name)


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_netlink_smoke_or_clean_skip(tmp_path):
    record = run_netlink_smoke(tmp_path, "netlink")
    if record is None:
        return
    (run,) = record["runs"]
    assert run["world_size"] == 2 and run["rate"] == "1gbit"
    # The interfaces saw at least the payload the counters claim, for both trainers.
    for name in ("distlion", "distlion_scaled", "adamw_ddp"):
        assert run[name]["wire_tx_bytes_per_step"] >= run[name]["bytes_sent_per_step"]
    assert run["ratios"]["counted_bytes_adamw_over_distlion"] > 30
    assert run["ratios"]["phase_adamw_over_distlion_scaled"] > 0


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_netlink_nodes_smoke_or_clean_skip(tmp_path):
    record = run_netlink_smoke(tmp_path, "netlink-2x2", "--ranks_per_node", "2")
    if record is None:
        return
    (run,) = record["runs"]
    assert (run["world_size"], run["nodes"], run["ranks_per_node"]) == (4, 2, 2)
    assert run["distlion"]["ranks_per_node"] == 1 and run["distlion_node"]["ranks_per_node"] == 2
    wire = {name: run[name]["wire_tx_bytes_per_step"] for name in ("distlion_node", "distlion", "adamw_ddp")}
    assert wire["distlion_node"] < wire["distlion"] < wire["adamw_ddp"]
    node = run["distlion_node"]
    vote = 2 * node["inter_node_bytes_sent_per_step"]  # the node's two ranks
    intra = node["bytes_sent_per_step"] - node["inter_node_bytes_sent_per_step"]  # one rank's
    # The vote crosses the veth; the reduce-scatter and all-gather stay on the node's loopback.
    assert vote <= node["wire_tx_bytes_per_step"] < intra
    assert 2 * intra <= node["loopback_tx_bytes_per_step"]
    assert set(run["targets"]) == {"wire_bytes_adamw_over_node >= 40", "wire_bytes_flat_over_node > 1"}


@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_lion_gap_smoke(tmp_path):
    result = run_benchmark("lion_gap", tmp_path, timeout=170)
    record = load(tmp_path, "lion_gap_variants")
    runs = {r["variant"]: r for r in record["runs"]}
    assert set(runs) == set(lion_gap.SMOKE_VARIANTS)
    for run in runs.values():
        assert [step for step, _ in run["val_loss_curve"]] == [2, 4]
        assert 0 < run["final_val_loss"] < 6  # ln(256) = 5.55 at the start; finite
    assert runs["lion_untied_emb30_head3"]["num_parameters"] == runs["adamw"]["num_parameters"] + 256 * 32
    assert "lion_emb10_adamw_proj_fc_out" in result.stdout and "vs adamw" in result.stdout
    # the scaled step's mean size, in units of lr, is a mean of squares of values in [-1, 1]
    assert 0 < runs["lion_lr6x_emb10_vote_ema"]["mean_step_scale"] <= 1
    assert runs["adamw"]["mean_step_scale"] is None


def test_lion_gap_scaled_step_variant_builds_distlion_with_it():
    from launch.model import GPT, GPTConfig

    (lion,) = lion_gap.build_optimizers(GPT(GPTConfig(1, 2, 32, 16)), lion_gap.VARIANTS["lion_lr6x_emb10_vote_ema"])
    assert {g["vote_ema_beta"] for g in lion.param_groups} == {0.9}
    assert max(g["base_lr"] for g in lion.param_groups) == pytest.approx(6e-2)  # embeddings: 6x then 10x
    assert {g["weight_decay"] for g in lion.param_groups} == {0.0, 0.3}


def test_lion_gap_hybrid_splits_the_parameters_by_kind():
    from distlion import DistLion
    from launch.model import GPT, GPTConfig

    model = GPT(GPTConfig(2, 2, 32, 16, tied_output=False))
    lion, adamw = lion_gap.build_optimizers(model, {"lr_scale": {"emb": 10, "head": 3},
                                                    "adamw_kinds": ["proj", "fc", "out"]})
    assert isinstance(lion, DistLion) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert adamw_names == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.proj", "fc", "out")}
    lion_groups = {tuple(sorted(names[id(p)] for p in g["params"])): g for g in lion.param_groups}
    assert lion_groups[("pos.weight", "tok.weight")]["base_lr"] == pytest.approx(1e-2)
    assert lion_groups[("head.weight",)]["base_lr"] == pytest.approx(3e-3)
    vec = next(g for key, g in lion_groups.items() if "ln_f.weight" in key)
    assert vec["weight_decay"] == 0.0 and vec["base_lr"] == pytest.approx(1e-3)
    assert len(vec["params"]) == sum(p.dim() == 1 for p in model.parameters())
    assert {len(g["params"]) for g in adamw.param_groups} == {2} and all(
        g["weight_decay"] == 0.1 and g["base_lr"] == pytest.approx(3e-3) for g in adamw.param_groups)


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, parent id, ...]."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(entry)[1]) == pid:
                    found.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


@pytest.mark.scripts
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads parent ids from /proc")
@pytest.mark.timeout(120)
def test_lion_gap_workers_end_with_their_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-m", "benchmarks.lion_gap", "--variants", "adamw", "--steps", "100000",
                               "--jobs", "1", "--out", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(_children(parent.pid)) < 2 and time.monotonic() < deadline:  # the worker and spawn's tracker
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert workers, "benchmarks.lion_gap started no worker process"
        parent.terminate()  # SIGTERM to the parent alone, as a scheduler would send it
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and _stat(pid)[0] != "Z"]
        assert not alive, f"worker processes {alive} outlived their parent"
    finally:
        parent.kill()
