"""strategy="distlion" in real launches: 2 gloo CPU processes running tests/lightning_job.py.

Two launches serve all tests. ``python tests/lightning_job.py`` (Lightning's own launcher
starts rank 1) trains EPOCHS epochs from scratch (bf16-mixed, gradient accumulation,
clipping, a per-step LR schedule, a NaN on rank 1 at one step, a checkpoint after every
epoch), then 3 steps under "16-mixed" and 2 with AdamW. ``torchrun`` tries two checkpoints
that must fail, then resumes from the first epoch's checkpoint in a fresh launch. Each
launch runs under a timeout, so a hang fails instead of stalling CI.
"""

import csv
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning_job as job  # noqa: E402
from launchers import ROOT, free_port, run_bounded  # noqa: E402
from rank_checks import all_gather_bytes_per_step, assert_resume_errors, make_bad_checkpoints, saved_state_files  # noqa: E402
from distlion import DistLion  # noqa: E402
from distlion.lightning import LOGGED_STATS, DistLionStrategy, comm_logs, state_directory  # noqa: E402

pytestmark = pytest.mark.integration

JOB = ROOT / "tests" / "lightning_job.py"
WORLD = job.WORLD
STEPS = job.EPOCHS * job.STEPS_PER_EPOCH
FIRST = f"epoch=0-step={job.STEPS_PER_EPOCH}.ckpt"  # the checkpoint the resume starts from
LAUNCH_TIMEOUT = 240  # seconds per launch


def launch(launcher: str, out: Path, *job_args: str) -> None:
    """Run the job on WORLD CPU processes (Lightning's own launcher, or torchrun); fail on error or timeout."""
    port = str(free_port())
    if launcher == "lightning":  # Trainer(devices=2) starts the second process itself
        command = [sys.executable, str(JOB)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
                   "127.0.0.1", "--master_port", port, str(JOB)]
    command += ["--out", str(out), *job_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    result = run_bounded(command, env, LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{launcher} failed ({result.returncode}):\n{result.stderr[-6000:]}"


def results(out: Path, phase: str) -> list[dict]:
    return [torch.load(out / f"{phase}_rank{rank}.pt", weights_only=False) for rank in range(WORLD)]



def logged_rows(out: Path, name: str) -> list[dict]:
    with open(out / name / "version_0" / "metrics.csv") as f:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lightning")


@pytest.fixture(scope="module")
def trained(out):
    launch("lightning", out, "--phase", "train")
    return results(out, "train")


@pytest.fixture(scope="module")
def resumed(trained, out):
    checkpoint = out / "checkpoints" / FIRST
    # What another strategy (or save_weights_only) leaves: the .ckpt without DistLion's per-rank files.
    plain = out / "bad" / "plain" / FIRST
    plain.parent.mkdir(parents=True)
    shutil.copy(checkpoint, plain)
    # The same save re-split for 3 processes, and its files without their manifest.
    world3, unsealed = out / "bad" / "world3" / FIRST, out / "bad" / "unsealed" / FIRST
    for bad in (world3, unsealed):
        bad.parent.mkdir(parents=True)
        shutil.copy(checkpoint, bad)
    make_bad_checkpoints(state_directory(checkpoint), state_directory(world3), state_directory(unsealed))
    launch("torchrun", out, "--phase", "resume", "--ckpt", str(checkpoint), "--bad-ckpt", str(plain),
           "--bad-ckpt", str(world3), "--bad-ckpt", str(unsealed))
    return results(out, "resume")


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_gradients_stay_local_and_replicas_stay_identical(trained):
    for rank, result in enumerate(trained):
        assert result["strategy_type"] == "DistLionStrategy" and result["model_type"] == "DistributedDataParallel"
        assert [facts["global_step"] for facts in result["steps"]] == list(range(1, STEPS + 1))
        for facts in result["steps"]:
            assert not facts["grads_same"], f"rank {rank} step {facts['global_step']}: gradients were all-reduced"
            assert facts["params_same"], f"rank {rank} step {facts['global_step']}: parameters differ between ranks"
        assert not result["comm"]["gradients_already_averaged"]
    assert all(torch.equal(a, b) for a, b in zip(trained[0]["params"], trained[1]["params"]))
    # Momentum is each rank's own.
    assert not any(torch.equal(a, b) for a, b in zip(trained[0]["momentum"], trained[1]["momentum"]))


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_loss_decreases_under_bf16_with_the_lr_schedule(trained):
    batches = job.STEPS_PER_EPOCH * job.ACCUMULATE
    for result in trained:
        assert result["precision"] == "bf16-mixed"
        losses = result["losses"]
        assert len(losses) == job.EPOCHS * batches
        assert sum(losses[-batches:]) < 0.75 * sum(losses[:batches])  # the last epoch against the first
        # The scheduler steps after every optimizer step, on every rank, skipped step included.
        assert [facts["lr"] for facts in result["steps"]] == pytest.approx(
            [job.LR * job.lr_factor(step) for step in range(1, STEPS + 1)], abs=1e-12)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_accumulation_votes_once_per_step_and_clipping_is_per_rank(trained):
    for result in trained:
        # After every batch: DistLion has voted once per finished optimizer step.
        assert result["micro_votes"] == [(batch + 1) // job.ACCUMULATE for batch in range(STEPS * job.ACCUMULATE)]
        assert [facts["votes"] for facts in result["steps"]] == list(range(1, STEPS + 1))
        for facts in result["steps"]:
            if facts["global_step"] != job.SKIP_AT + 1:
                assert facts["local_norm"] > job.CLIP  # the clip binds
                assert facts["clipped_norm"] == pytest.approx(job.CLIP, rel=1e-4)
    # Each rank clips its own local gradient: the norms differ between ranks.
    norms = [[facts["local_norm"] for facts in result["steps"]] for result in trained]
    assert norms[0][0] != norms[1][0]


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(trained):
    for rank, result in enumerate(trained):
        before, skipped, after = result["steps"][job.SKIP_AT - 1:job.SKIP_AT + 2]
        assert (before["skipped"], skipped["skipped"], after["skipped"]) == (0, 1, 1)
        assert skipped["params_sum"] == before["params_sum"] != after["params_sum"]  # nothing applied, then on
        assert (skipped["local_norm"] != skipped["local_norm"]) == (rank == job.SKIP_RANK)  # NaN on rank 1 only
        assert result["global_step"] == STEPS and result["comm"]["skipped_steps"] == 1
    assert [facts["params_sum"] for facts in trained[0]["steps"]] == [f["params_sum"] for f in trained[1]["steps"]]
    # "16-mixed" (torch's CPU GradScaler): unscaled before clipping, and every rank's scaler backs off together.
    for result in trained:
        fp16 = result["fp16"]
        assert fp16["plugin"] == "_DistLionMixedPrecision" and fp16["comm"]["skipped_steps"] == 1
        scales = [facts["scale"] for facts in fp16["steps"]]
        assert scales[job.SKIP_AT] == scales[job.SKIP_AT - 1] / 2 and all(f["scales_same"] for f in fp16["steps"])
        assert all(f["params_same"] and not f["grads_same"] for f in fp16["steps"])
        assert fp16["steps"][0]["clipped_norm"] == pytest.approx(job.CLIP, rel=1e-4)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_comm_figures_reach_the_logged_metrics(trained, out):
    expected = all_gather_bytes_per_step(trained[0]["numel"], WORLD)
    fp32 = 2 * (WORLD - 1) * 4 * trained[0]["numel"] // WORLD  # DDP's fp32 ring all-reduce, per rank and step
    rows = logged_rows(out, "train")  # CSVLogger, written by rank 0
    assert [row["step"] for row in rows] == list(range(STEPS))
    for step, row in enumerate(rows, start=1):
        assert row["distlion/steps"] == step and row["distlion/skipped_steps"] == int(step > job.SKIP_AT)
        assert row["distlion/bytes_sent"] == expected * step
        assert row["distlion/bytes_sent_per_step"] == expected
        assert row["distlion/allreduce_fp32_bytes"] == fp32 * step
        assert row["distlion/compression"] == pytest.approx(fp32 / expected)
    for result in trained:  # every rank logs them (no cross-rank reduction)
        assert result["callbacks"][0] == "CommMetricsCallback"
        assert result["logged_metrics"]["distlion/bytes_sent"] == expected * STEPS == result["comm"]["bytes_sent"]


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_checkpoints_hold_every_ranks_optimizer_state(trained, out):
    for step in range(job.STEPS_PER_EPOCH, STEPS + 1, job.STEPS_PER_EPOCH):
        checkpoint = out / "checkpoints" / f"epoch={step // job.STEPS_PER_EPOCH - 1}-step={step}.ckpt"
        directory = Path(state_directory(checkpoint))
        names = saved_state_files(str(directory), WORLD)
        for rank in range(WORLD):
            state = torch.load(directory / names[rank], weights_only=True)
            assert state["distlion"]["rank"] == rank and state["distlion"]["comm_stats"]["steps"] == step
            assert state["distlion"]["step"] == step - 1  # steps applied: the skipped one is not
        # Lightning's file (rank 0's) keeps the hyperparameters; the momentum is in the per-rank files.
        saved = torch.load(checkpoint, weights_only=False)
        (optimizer_state,) = saved["optimizer_states"]
        assert optimizer_state["state"] == {} and optimizer_state["distlion_state_files"] == directory.name
        assert saved["lr_schedulers"] and saved["global_step"] == step
    # ModelCheckpoint(save_top_k=1, every_n_train_steps=2) removed the files of the checkpoints it replaced.
    latest = out / "latest"
    last = f"epoch={job.EPOCHS - 1}-step={STEPS}.ckpt"
    assert sorted(p.name for p in latest.iterdir()) == [last, last + ".distlion"]
    assert len(saved_state_files(str(latest / (last + ".distlion")), WORLD)) == WORLD


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 30)
def test_resume_in_a_fresh_launch_is_bitwise_equal(trained, resumed, out):
    batches = job.STEPS_PER_EPOCH * job.ACCUMULATE
    for rank, (full, resume) in enumerate(zip(trained, resumed)):
        assert resume["strategy_type"] == "DistLionStrategy" and resume["world_size"] == WORLD
        for name in ("params", "momentum"):
            assert all(torch.equal(a, b) for a, b in zip(full[name], resume[name])), \
                f"rank {rank}: {name} after resuming differ from the uninterrupted run"
        assert resume["comm"] == full["comm"]
        assert resume["steps"] == full["steps"][job.STEPS_PER_EPOCH:]  # local gradients, replicas, lr, bytes
        assert resume["losses"] == full["losses"][batches:]
    assert logged_rows(out, "resume") == logged_rows(out, "train")[job.STEPS_PER_EPOCH:]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 30)
def test_resume_without_distlion_files_or_from_another_world_size_fails_on_every_rank(resumed):
    assert_resume_errors(resumed, WORLD, 'strategy="distlion"')


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_any_other_optimizer_keeps_ddps_allreduce(trained):
    for result in trained:
        run = result["adamw"]
        assert all(facts["grads_same"] and facts["params_same"] for facts in run["steps"])
        assert "CommMetricsCallback" not in run["callbacks"]


def test_strategy_is_registered_and_refuses_ddp_comm_hooks():
    from lightning.pytorch.strategies import StrategyRegistry
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    assert StrategyRegistry["distlion"]["strategy"] is DistLionStrategy
    with pytest.raises(ValueError, match="remove ddp_comm_hook"):
        DistLionStrategy(ddp_comm_hook=allreduce_hook)
    model = torch.nn.Linear(4, 2)
    logs = comm_logs(DistLion(model.parameters(), lr=1e-3))
    assert list(logs) == [f"distlion/{key}" for key in LOGGED_STATS]
    with pytest.raises(TypeError, match="needs a DistLion optimizer"):
        comm_logs(torch.optim.SGD(model.parameters(), lr=0.1))
