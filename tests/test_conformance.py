"""Every integration through the same checks, in real launches of 2 gloo CPU processes.

One launch per integration (tests/conformance_job.py, ``--phase <integration>``) trains
from scratch with a NaN on one rank at one step and a checkpoint on the way, tries damaged
and foreign copies of the checkpoint, then resumes from it in fresh objects. The checks:

- gradients stay local: the gradients DistLion gets differ between the ranks (nothing
  all-reduced them) and ``comm_stats`` counts the vote's bytes, and nothing else, per step;
- replicas stay identical: every rank's parameters are equal after every step;
- a skip is agreed: a NaN in one rank's gradient leaves the parameters unchanged on every rank;
- resume is bitwise: the resumed steps and DistLion's final state equal the uninterrupted run's;
- a damaged or foreign checkpoint fails on every rank (none hangs), with a message that says so.

A case an integration cannot pass is in ``XFAIL`` with its reason (strict: it fails once it passes).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import conformance_job as job
from launchers import ROOT, accelerate_command, free_port, run_bounded, torchrun_command
from rank_checks import all_gather_bytes_per_step

LAUNCH_TIMEOUT = 300  # seconds per launch: a hang fails instead of stalling CI
pytestmark = [pytest.mark.integration, pytest.mark.timeout(LAUNCH_TIMEOUT + 60)]

JOB = ROOT / "tests" / "conformance_job.py"
WORLD = job.WORLD
# integration -> the modules it needs (skipped without them)
INTEGRATIONS = {"torchrun": (), "accelerate": ("accelerate",), "deepspeed": ("deepspeed",),
                "transformers": ("transformers", "accelerate"), "lightning": ("lightning",),
                "fsdp2_dcp": ("torch.distributed.fsdp", "torch.distributed.checkpoint")}
# what every rank's error must say, per bad checkpoint (job.BAD_CHECKPOINTS)
REFUSALS = {"truncated": "the file is truncated or was rewritten",
            "without_distlion": "No DistLion optimizer state for rank",
            "unfinished": "but no manifest distlion_optimizer0_manifest.json: the save that wrote them did not finish"}
# FSDP2 + DCP: DistLion's state is in DCP's files, and DCP's reader raises (its own words, on every rank)
DCP_REFUSALS = {"truncated": "your checkpoint file is corrupted",
                "without_distlion": "Missing key in checkpoint state_dict: optimizer.",
                "unfinished": ".metadata"}
XFAIL: dict[tuple[str, str], str] = {  # (integration, check) -> why it cannot pass
    ("deepspeed", "elastic_resume"): "the shipped bf16 config: DeepSpeed's BF16 optimizer nests DistLion's state, which "
                                     "resumes on its own topology only (an fp32 engine's maps: test_deepspeed.py)",
}


def launch_command(integration: str) -> list[str]:
    if integration == "accelerate":
        return [*accelerate_command(), "--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
                "--num_processes", str(WORLD), "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    return torchrun_command(WORLD)  # Lightning and Trainer take torchrun's processes as theirs


@pytest.fixture(scope="module", params=list(INTEGRATIONS))
def run(request, tmp_path_factory) -> list[dict]:
    """Launch one integration's conformance job; return each rank's record."""
    integration = request.param
    for module in INTEGRATIONS[integration]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{integration} needs {module}")
    out: Path = tmp_path_factory.mktemp(f"conformance_{integration}")
    # HF_HOME: no default_config.yaml or hub cache of this machine's user slips into the launch.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(out / "hf_home")}
    command = [*launch_command(integration), str(JOB), "--phase", integration, "--out", str(out)]
    result = run_bounded(command, env, LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{integration} failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return [torch.load(out / f"{integration}_rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def expect_to_pass(request, run: list[dict], check: str) -> None:
    reason = XFAIL.get((run[0]["integration"], check))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def test_gradients_stay_local_and_comm_stats_count_the_vote(request, run):
    expect_to_pass(request, run, "local_gradients")
    first, second = (record["full"]["steps"] for record in run)
    for a, b in zip(first, second):
        assert not torch.equal(a["grad"], b["grad"]), f"step {a['step']}: the ranks' gradients are equal (all-reduced)"
    # Momentum is each rank's own too: a resume that gave every rank rank 0's would fail test_resume_is_bitwise.
    assert not torch.equal(*(record["full"]["state"]["momentum"] for record in run))
    per_step = all_gather_bytes_per_step(run[0]["full"]["numel"], WORLD)
    for rank, record in enumerate(run):
        sent, exchanges = ([0] + [s[key] for s in record["full"]["steps"]] for key in ("bytes_sent", "exchanges"))
        for step in range(job.STEPS):
            exchanged = exchanges[step + 1] - exchanges[step]
            # at the skipped step a wrapper (DeepSpeed's bf16 optimizer) may skip before DistLion exchanges
            assert exchanged == 1 or (step == job.SKIP_AT and exchanged == 0), f"rank {rank} step {step}"
            assert sent[step + 1] - sent[step] == per_step * exchanged, f"rank {rank} step {step}: not the vote's bytes"


def test_replicas_stay_identical(request, run):
    expect_to_pass(request, run, "identical_replicas")
    for name in ("full", "resumed"):
        first, second = (record[name]["steps"] for record in run)
        assert len(first) == len(second) > 0
        for a, b in zip(first, second):
            assert torch.equal(a["params"], b["params"]), f"{name} run, step {a['step']}: the ranks' parameters differ"


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(request, run):
    expect_to_pass(request, run, "agreed_skip")
    for rank, record in enumerate(run):
        steps = record["full"]["steps"]
        assert [s["step"] for s in steps] == list(range(job.STEPS))
        assert bool(torch.isfinite(steps[job.SKIP_AT]["grad"]).all()) == (rank != job.SKIP_RANK)
        for step in range(1, job.STEPS):
            moved = not torch.equal(steps[step]["params"], steps[step - 1]["params"])
            assert moved == (step != job.SKIP_AT), f"rank {rank} step {step}: {'moved' if moved else 'did not move'}"


def test_resume_is_bitwise(request, run):
    expect_to_pass(request, run, "bitwise_resume")
    for rank, record in enumerate(run):
        full, resumed = record["full"], record["resumed"]
        assert [s["step"] for s in resumed["steps"]] == list(range(job.SAVE_AT, job.STEPS))
        for a, b in zip(full["steps"][job.SAVE_AT:], resumed["steps"]):
            assert torch.equal(a["params"], b["params"]), f"rank {rank} step {a['step']}: resumed parameters differ"
        for name, value in full["state"].items():
            assert torch.equal(value, resumed["state"][name]), f"rank {rank}: resumed {name} differs"


def test_a_checkpoint_of_another_topology_resumes(request, run):
    """Saved by 3 ranks (the per-rank files re-split offline) or, under FSDP2, by 1 replica: every entry point
    resumes on 2, at the saved step, and the replicas stay identical."""
    expect_to_pass(request, run, "elastic_resume")
    assert all(record["elastic"] is not None for record in run), "the state was not re-split"
    first, second = (record["elastic"]["steps"] for record in run)
    assert [s["step"] for s in first] == list(range(job.SAVE_AT, job.STEPS))
    for a, b in zip(first, second):
        assert torch.equal(a["params"], b["params"]), f"step {a['step']}: the ranks' parameters differ"
    assert not torch.equal(first[0]["params"], first[-1]["params"])  # it trained


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_damaged_or_foreign_checkpoint_is_refused_on_every_rank(request, run, case):
    expect_to_pass(request, run, case)
    expected = (DCP_REFUSALS if run[0]["integration"] == "fsdp2_dcp" else REFUSALS)[case]
    for rank, record in enumerate(run):
        message = record["refusals"][case]
        assert message is not None, f"rank {rank} resumed from the {case} checkpoint"
        assert expected in message, f"rank {rank}: {message[:2000]}"
