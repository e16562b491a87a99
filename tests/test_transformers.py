"""DistLionTrainer in real launches: 2 gloo CPU processes running tests/transformers_job.py.

Two launches serve all tests: ``torchrun`` trains a tiny GPT-2 (bf16, gradient
accumulation, clipping, cosine schedule, a checkpoint every SAVE_AT steps) to STEPS, then
runs a Trainer that builds DistLion from ``optimizer_cls_and_kwargs`` and one with AdamW;
``accelerate launch`` tries two checkpoints that must fail, then resumes the first run from
step SAVE_AT in a fresh launch. Each launch runs under a timeout, so a hang fails instead
of stalling CI.
"""

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import transformers_job as job  # noqa: E402
from launchers import ROOT, accelerate_command, free_port, run_bounded  # noqa: E402
from rank_checks import all_gather_bytes_per_step, assert_resume_errors, make_bad_checkpoints, saved_state_files  # noqa: E402
from distlion import DistLion  # noqa: E402
from distlion.transformers import LOGGED_STATS, comm_logs  # noqa: E402

pytestmark = pytest.mark.integration

JOB = ROOT / "tests" / "transformers_job.py"
WORLD = 2
LAUNCH_TIMEOUT = 240  # seconds per launch


def launch(launcher: str, out: Path, *job_args: str, env: dict[str, str] | None = None) -> None:
    """Run the job on WORLD CPU processes under ``torchrun`` or ``accelerate launch``; fail on error or timeout."""
    port = str(free_port())
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
                   "127.0.0.1", "--master_port", port]
    else:
        command = [*accelerate_command(), "--multi_gpu", "--num_machines", "1", "--num_processes", str(WORLD),
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", port]
    command += [str(JOB), "--out", str(out), *job_args]
    # HF_HOME: no default_config.yaml or hub cache of this machine's user slips into the launch.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(out / "hf_home"), **(env or {})}
    result = run_bounded(command, env, LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{launcher} failed ({result.returncode}):\n{result.stderr[-6000:]}"


def results(out: Path, phase: str) -> list[dict]:
    return [torch.load(out / f"{phase}_rank{rank}.pt", weights_only=False) for rank in range(WORLD)]



def losses(result: dict) -> list[dict]:
    return [entry for entry in result["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transformers")


@pytest.fixture(scope="module")
def trained(out):
    launch("torchrun", out, "--phase", "train")
    return results(out, "train")


@pytest.fixture(scope="module")
def resumed(trained, out):
    checkpoint = out / "train_run" / f"checkpoint-{job.SAVE_AT}"
    # What a plain Trainer (or save_only_model) leaves: the checkpoint without DistLion's files.
    plain = out / "bad" / "plain"
    shutil.copytree(checkpoint, plain, ignore=shutil.ignore_patterns("distlion_*"))
    # The same save re-split for 3 processes, and its files without their manifest.
    world3, unsealed = out / "bad" / "world3", out / "bad" / "unsealed"
    for bad in (world3, unsealed):
        shutil.copytree(checkpoint, bad, ignore=shutil.ignore_patterns("distlion_*"))
    make_bad_checkpoints(str(checkpoint), str(world3), str(unsealed))
    launch("accelerate", out, "--phase", "resume", "--ckpt", str(checkpoint), "--bad-ckpt", str(plain),
           "--bad-ckpt", str(world3), "--bad-ckpt", str(unsealed))
    return results(out, "resume")


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_gradients_stay_local_and_replicas_stay_identical(trained):
    for rank, result in enumerate(trained):
        assert result["model_type"] == "DistributedDataParallel"  # Trainer's DDP, its all-reduce stopped
        assert [facts["step"] for facts in result["steps"]] == list(range(1, job.STEPS + 1))
        for facts in result["steps"]:
            assert not facts["grads_same"], f"rank {rank} step {facts['step']}: gradients were all-reduced"
            assert facts["params_same"], f"rank {rank} step {facts['step']}: parameters differ between ranks"
        assert not result["comm"]["gradients_already_averaged"]
    assert all(torch.equal(a, b) for a, b in zip(trained[0]["params"], trained[1]["params"]))
    # Momentum is each rank's own.
    assert not any(torch.equal(a, b) for a, b in zip(trained[0]["momentum"], trained[1]["momentum"]))


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_loss_decreases_under_bf16_with_the_lr_schedule(trained):
    for result in trained:
        assert result["mixed_precision"] == "bf16"
        logged = losses(result)
        assert len(logged) == job.STEPS and logged[-1]["loss"] < logged[0]["loss"] - 0.2
        # Trainer's cosine schedule with 2 warm-up steps sets DistLion's lr after every step.
        expected = [job.LR * step / 2 if step < 2 else
                    job.LR * 0.5 * (1 + math.cos(math.pi * (step - 2) / (job.STEPS - 2)))
                    for step in range(1, job.STEPS + 1)]
        assert [facts["lr"] for facts in result["steps"]] == pytest.approx(expected, abs=1e-12)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_accumulation_votes_once_per_step_and_clipping_is_per_rank(trained):
    for result in trained:
        # After each micro-step that is not the last of a step, DistLion has voted once per finished step.
        assert result["micro_votes"] == list(range(job.STEPS))
        assert [facts["votes"] for facts in result["steps"]] == list(range(1, job.STEPS + 1))
        for facts, logged in zip(result["steps"], losses(result)):
            assert logged["grad_norm"] > job.MAX_GRAD_NORM  # Trainer's norm before clipping: the clip binds
            assert facts["clipped_norm"] == pytest.approx(job.MAX_GRAD_NORM, rel=1e-4)
    # Each rank clips its own local gradient: the norms Trainer saw differ between ranks.
    norms = [[entry["grad_norm"] for entry in losses(result)] for result in trained]
    assert norms[0] != norms[1]


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_comm_figures_reach_the_log_history(trained):
    expected = all_gather_bytes_per_step(trained[0]["numel"], WORLD)
    fp32 = 2 * (WORLD - 1) * 4 * trained[0]["numel"] // WORLD  # DDP's fp32 ring all-reduce, per rank and step
    for result in trained:
        assert [facts["bytes_sent"] for facts in result["steps"]] == [expected * s for s in range(1, job.STEPS + 1)]
        for step, entry in enumerate(losses(result), start=1):
            assert entry["distlion/steps"] == step and entry["distlion/skipped_steps"] == 0
            assert entry["distlion/bytes_sent"] == expected * step
            assert entry["distlion/bytes_sent_per_step"] == expected
            assert entry["distlion/allreduce_fp32_bytes"] == fp32 * step
            assert entry["distlion/compression"] == pytest.approx(fp32 / expected)
        assert result["comm"]["compression"] > 30


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_checkpoints_hold_every_ranks_optimizer_state(trained, out):
    for step in (job.SAVE_AT, job.STEPS):
        checkpoint = out / "train_run" / f"checkpoint-{step}"
        names = saved_state_files(str(checkpoint), WORLD)
        assert not (checkpoint / "optimizer.pt").exists()  # rank 0's state alone would be wrong for rank 1
        assert (checkpoint / "scheduler.pt").exists() and (checkpoint / "model.safetensors").exists()
        for rank in range(WORLD):
            state = torch.load(checkpoint / names[rank], weights_only=True)
            assert state["distlion"]["rank"] == rank and state["distlion"]["step"] == step


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 30)
def test_resume_in_a_fresh_launch_is_bitwise_equal(trained, resumed):
    for rank, (full, resume) in enumerate(zip(trained, resumed)):
        for name in ("params", "momentum"):
            assert all(torch.equal(a, b) for a, b in zip(full[name], resume[name])), \
                f"rank {rank}: {name} after resuming differ from the uninterrupted run"
        assert resume["comm"] == full["comm"]
        # The resumed log: the checkpoint's (written by rank 0, its grad_norm), then the same steps again.
        assert losses(resume) == losses(trained[0])[:job.SAVE_AT] + losses(full)[job.SAVE_AT:]
        assert resume["steps"] == full["steps"][job.SAVE_AT:]  # local gradients, identical replicas, bytes, lr


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 30)
def test_resume_without_distlion_files_or_from_another_world_size_fails_on_every_rank(resumed):
    assert_resume_errors(resumed, WORLD, "saved by DistLionTrainer")


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_optimizer_cls_and_kwargs_builds_distlion(trained):
    for result in trained:
        run = result["cls_run"]
        assert run["is_distlion"] and run["model_type"] == "DistributedDataParallel"
        assert run["weight_decays"] == [0.1, 0.0]  # Trainer's groups: decay, and no decay for biases and norms
        assert all(not facts["grads_same"] and facts["params_same"] for facts in run["steps"])
        assert [facts["votes"] for facts in run["steps"]] == [1, 2]


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_any_other_optimizer_gets_plain_trainer(trained, out):
    for result in trained:
        run = result["adamw_run"]
        assert run["distlion"] is None
        assert all(facts["grads_same"] and facts["params_same"] for facts in run["steps"])  # DDP all-reduces
    checkpoint = out / "adamw_run" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and not list(checkpoint.glob("distlion_*"))


def test_comm_logs_names_distlion_figures():
    model = torch.nn.Linear(4, 2)
    logs = comm_logs(DistLion(model.parameters(), lr=1e-3))
    assert list(logs) == [f"distlion/{key}" for key in LOGGED_STATS]
    assert logs["distlion/steps"] == 0 and logs["distlion/bytes_sent"] == 0
    with pytest.raises(TypeError, match="needs a DistLion optimizer"):
        comm_logs(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> list[dict]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("transformers_deepspeed")
    # No ACCELERATE_USE_CPU: Accelerate would fall back to DDP; the job names gloo (ddp_backend) instead.
    launch("torchrun", out, "--phase", "deepspeed", env={"ACCELERATE_USE_CPU": "false"})
    return results(out, "deepspeed")


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
@pytest.mark.parametrize("way_in", ["entry", "client"])
def test_deepspeed_config_reaches_distlion_with_local_gradients_and_resumes_bitwise(deepspeed_runs, way_in):
    """Trainer(deepspeed=...): "type": "DistLion" in the config, or optimizers=(DistLion(...), None), which
    Trainer's DeepSpeed setup would otherwise replace by AdamW."""
    for record in deepspeed_runs:
        train, resume = record[way_in]["train"], record[way_in]["resume"]
        assert train["allreduce"] is False and resume["allreduce"] is False
        assert train["grads_same"] == [False] * job.STEPS, "DistLion's gradients were all-reduced"
        assert resume["grads_same"] == [False] * (job.STEPS - job.SAVE_AT)
        assert all(step["params_same"] for step in train["steps"] + resume["steps"])
        assert train["comm"]["steps"] == job.STEPS
        assert train["comm"]["bytes_sent"] == job.STEPS * all_gather_bytes_per_step(train["numel"], WORLD)
        saved = [name for name in record[way_in]["saved"] if name.startswith("distlion_optimizer0_rank")]
        assert [name.split(".")[0] for name in saved] == [f"distlion_optimizer0_rank{r}_of_{WORLD}" for r in range(WORLD)]
        assert all(torch.equal(a, b) for a, b in zip(train["params"], resume["params"]))  # bitwise resume
        assert train["log_history"][0]["distlion/bytes_sent_per_step"] == all_gather_bytes_per_step(train["numel"], WORLD)
    assert all(torch.equal(a, b) for a, b in zip(deepspeed_runs[0][way_in]["train"]["params"],
                                                 deepspeed_runs[1][way_in]["train"]["params"]))
