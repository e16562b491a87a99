"""DistLion in real ``accelerate launch`` jobs: 2 gloo CPU processes running tests/accelerate_job.py.

Six launches serve all tests (each costs seconds of imports on a small CPU machine):
train (DistLion and AdamW side by side, save_state at step K), resume from K in a fresh
launch, gradient accumulation under bf16, fp16 with an inf on rank 1, a 3-process
launch that loads the 2-process checkpoint, and 4 processes as 2 nodes of 2
(ranks_per_node=2: train, save_state, load_state, train again); and 4 processes under
Accelerate's FSDP2 plugin (tests/accelerate_fsdp_job.py). Every launch runs the command the README
shows, under a timeout, so a hang fails instead of stalling CI.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402  (installed with accelerate)

import accelerate_job as job  # noqa: E402
from launchers import ROOT, accelerate_command, free_port, run_bounded  # noqa: E402
from rank_checks import all_gather_bytes_per_step, saved_state_files  # noqa: E402
import distlion  # noqa: E402
import distlion.accelerate  # noqa: E402
from distlion import DistLion  # noqa: E402

pytestmark = pytest.mark.integration

JOB = ROOT / "tests" / "accelerate_job.py"
CPU_CONFIG = ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"
WORLD = 2
STEPS, SAVE_AT = 8, 4  # save_state at step k = 4, train to 2k = 8
LAUNCH_TIMEOUT = 240  # seconds per launch


def launch(*job_args: str, num_processes: int = WORLD, mixed_precision: str = "no",
           config_file: bool = True, layout: list[str] | None = None, job: Path = JOB) -> subprocess.CompletedProcess:
    """Run the job under ``ACCELERATE_USE_CPU=true accelerate launch``, as the README shows.

    With ``config_file``: ``--config_file launch/accelerate/cpu_2proc.yaml``; without:
    ``--multi_gpu --num_processes N --num_machines 1``, no config at all; ``layout``: these options.
    """
    if layout is None:
        layout = ["--config_file", str(CPU_CONFIG)] if config_file else ["--multi_gpu", "--num_machines", "1"]
    command = [*accelerate_command(), *layout, "--num_processes", str(num_processes), "--mixed_precision",
               mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(job),
               *job_args]
    # HF_HOME: no default_config.yaml of this machine's user slips into the launch.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(Path(job_args[job_args.index("--out") + 1]) / "hf_home")}
    return run_bounded(command, env, LAUNCH_TIMEOUT)


def launch_ok(*job_args: str, **kwargs) -> subprocess.CompletedProcess:
    result = launch(*job_args, **kwargs)
    assert result.returncode == 0, f"launch failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return result


def results(out: Path, phase: str, world: int = WORLD) -> list[dict]:
    return [torch.load(out / f"{phase}_rank{rank}.pt", weights_only=False) for rank in range(world)]



@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("accelerate")


@pytest.fixture(scope="module")
def trained(out):
    launch_ok("--phase", "train", "--out", str(out), "--steps", str(STEPS), "--save-at", str(SAVE_AT),
              "--ckpt", str(out / "ckpt"))
    return results(out, "train")


@pytest.fixture(scope="module")
def resumed(trained, out):
    # What accelerator.save_state writes without distlion: the same directory minus DistLion's files.
    plain = out / "plain_ckpt"
    shutil.copytree(out / "ckpt", plain, ignore=shutil.ignore_patterns("distlion_*"))
    launch_ok("--phase", "resume", "--out", str(out), "--steps", str(STEPS), "--save-at", str(SAVE_AT),
              "--ckpt", str(out / "ckpt"), "--plain-ckpt", str(plain))
    return results(out, "resume")


@pytest.mark.timeout(300)
def test_distlion_keeps_gradients_local_and_parameters_identical(trained):
    for rank, result in enumerate(trained):
        assert len(result["steps"]) == STEPS
        for step, facts in enumerate(result["steps"]):
            assert not facts["grads_same"], f"rank {rank} step {step}: DistLion gradients were all-reduced"
            assert facts["params_same"], f"rank {rank} step {step}: DistLion parameters differ between ranks"
            assert facts["adamw_grads_same"], f"rank {rank} step {step}: AdamW gradients were not all-reduced"
            assert facts["adamw_params_same"], f"rank {rank} step {step}: AdamW parameters differ between ranks"
    assert all(torch.equal(a, b) for a, b in zip(trained[0]["params"], trained[1]["params"]))


@pytest.mark.timeout(300)
def test_bytes_per_step_match_core_formula_and_reach_the_tracker(trained, out):
    expected = all_gather_bytes_per_step(trained[0]["numel"], WORLD)
    for result in trained:
        assert [facts["bytes_sent"] for facts in result["steps"]] == [expected] * STEPS
        assert result["comm"]["bytes_sent_per_step"] == expected
        assert result["comm"]["bytes_sent"] == result["comm"]["bytes_received"] == expected * STEPS
    # accelerator.log(comm_metrics(optimizer)) reaches the configured tracker (main process only).
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(STEPS))
    assert all(entry["distlion/bytes_sent_per_step"] == expected for entry in logged)
    assert [entry["distlion/steps"] for entry in logged] == list(range(1, STEPS + 1))


@pytest.mark.timeout(300)
def test_save_model_writes_every_weight(trained, out):
    # Parameters are views of one bucket; Accelerate's safetensors writer alone keeps only one of them.
    saved = load_file(out / "final_model" / "model.safetensors")
    assert sorted(saved) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name, param in zip(["0.weight", "0.bias", "2.weight", "2.bias"], trained[0]["params"]):
        assert torch.equal(saved[name], param), name


@pytest.mark.timeout(300)
def test_save_state_writes_every_rank_and_the_whole_model(trained, out):
    ckpt = out / "ckpt"
    names = saved_state_files(str(ckpt), WORLD)
    # Parameters are views of one bucket; every weight must still be in the file.
    assert sorted(load_file(ckpt / "model.safetensors")) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for rank in range(WORLD):
        state = torch.load(ckpt / names[rank], weights_only=True)
        assert state["distlion"]["rank"] == rank and state["distlion"]["world_size"] == WORLD
        assert state["distlion"]["step"] == SAVE_AT


@pytest.mark.timeout(400)
def test_resume_from_save_state_is_bitwise_equal_on_every_rank(trained, resumed):
    for rank, (full, resume) in enumerate(zip(trained, resumed)):
        for name in ("params", "momentum", "adamw_params"):
            assert all(torch.equal(a, b) for a, b in zip(full[name], resume[name])), \
                f"rank {rank}: {name} after resuming differ from the uninterrupted run"
        assert resume["comm"] == full["comm"] and resume["lr"] == full["lr"]
        assert all(facts["params_same"] and not facts["grads_same"] for facts in resume["steps"])
    # Momentum differs between ranks, so restoring rank 0's on every rank would have failed the check above.
    assert not any(torch.equal(a, b) for a, b in zip(trained[0]["momentum"], trained[1]["momentum"]))


@pytest.mark.timeout(400)
def test_load_state_of_a_directory_saved_without_distlion_fails_clearly(resumed):
    for rank, result in enumerate(resumed):
        (message,) = result["load_errors"]
        assert "saved without distlion" in message
        assert "expected distlion_optimizer0_manifest.json" in message and "optimizer.bin" in message


@pytest.mark.timeout(300)
def test_gradient_accumulation_votes_once_on_summed_gradients(out):
    optimizer_steps = 3
    launch_ok("--phase", "accumulate", "--out", str(out), "--steps", str(optimizer_steps), mixed_precision="bf16",
              config_file=False)
    ranks = results(out, "accumulate")
    for rank, result in enumerate(ranks):
        micro = result["micro"]
        assert len(micro) == optimizer_steps * job.MICRO_STEPS
        # DistLion votes only on sync steps: once every MICRO_STEPS micro-steps.
        assert [m["votes"] for m in micro] == [(i + 1) // job.MICRO_STEPS for i in range(len(micro))]
        for m in (m for m in micro if m["sync"]):
            assert m["grads_equal_reference"], f"rank {rank}: accumulated gradients != summed micro-gradients"
            assert not m["grads_same"], f"rank {rank}: gradients were all-reduced"
            assert m["norm"] == m["reference_norm"]
            assert m["params_equal_reference"] and m["momentum_equal_reference"], \
                f"rank {rank}: accumulation differs from one step on the summed gradients"
            assert m["params_same"]
    # clip_grad_norm_ sees local gradients: the norm differs between ranks.
    norms = [[m["norm"] for m in result["micro"] if m["sync"]] for result in ranks]
    assert norms[0] != norms[1]


@pytest.mark.timeout(300)
def test_fp16_inf_on_one_rank_skips_on_every_rank_and_training_goes_on(out):
    launch_ok("--phase", "fp16", "--out", str(out), "--steps", "6", mixed_precision="fp16")
    ranks = results(out, "fp16")
    for rank, result in enumerate(ranks):
        assert result["scaler"] == "GradScaler"
        steps = result["steps"]
        assert [s["skipped"] for s in steps] == [step == job.INF_STEP for step in range(6)], f"rank {rank}"
        assert [s["changed"] for s in steps] == [step != job.INF_STEP for step in range(6)], f"rank {rank}"
        # Every rank's GradScaler backs off, not only rank INF_RANK's; LR schedules stay together.
        assert all(s["scale_same"] and s["lr_same"] and s["params_same"] and s["params_finite"] for s in steps)
        assert steps[job.INF_STEP]["scale"] == steps[job.INF_STEP - 1]["scale"] / 2
        assert result["comm"]["skipped_steps"] == 1 and result["comm"]["steps"] == 6


@pytest.mark.timeout(300)
def test_load_state_on_another_world_size_resumes_and_says_so_once(trained, out):
    result = launch("--phase", "load", "--out", str(out / "other_world"), "--ckpt", str(out / "ckpt"),
                    num_processes=3)
    assert result.returncode == 0, result.stderr[-4000:]
    said = re.findall(r"DistLion: resumed .* saved by 2 voter\(s\) of 1 rank\(s\) \(world size 2\), on 3 voter\(s\) "
                      r"of 1 rank\(s\) \(world size 3\): each new voter's momentum by the 'mean' rule", result.stderr)
    assert len(said) == 1, result.stderr[-4000:]  # once, by rank 0
    assert all((out / "other_world" / f"load_rank{rank}.pt").exists() for rank in range(3))


@pytest.mark.timeout(300)
def test_nodes_of_two_ranks_train_identical_replicas_and_resume_bit_for_bit(out):
    world, ranks_per_node = 4, 2
    launch_ok("--phase", "nodes", "--out", str(out / "nodes"), "--steps", str(STEPS), "--save-at", str(SAVE_AT),
              "--ckpt", str(out / "nodes" / "ckpt"), "--ranks-per-node", str(ranks_per_node), num_processes=world)
    ranks = results(out / "nodes", "nodes", world)
    numel = sum(p.numel() for p in job.make_model(0).parameters())
    for rank, result in enumerate(ranks):
        assert result["ranks_per_node"] == ranks_per_node
        assert result["state_numel"] <= numel // ranks_per_node + 64  # this rank's chunk of the momentum
        full, again = result["full"], result["resumed"]
        assert len(full["params"]) == STEPS and len(again["params"]) == STEPS - SAVE_AT
        assert all(full["params_same"]) and all(again["params_same"]), f"rank {rank}: replicas differ"
        assert not any(full["grads_same"]), f"rank {rank}: gradients were all-reduced"
        for step, (a, b) in enumerate(zip(full["params"][SAVE_AT:], again["params"]), start=SAVE_AT):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"rank {rank}: parameters differ after step {step}"
        assert all(torch.equal(a, b) for a, b in zip(full["momentum"], again["momentum"]))
        assert again["comm"] == full["comm"] and again["lr"] == full["lr"]
        assert full["comm"]["ranks_per_node"] == ranks_per_node and full["comm"]["inter_node_bytes_sent"] > 0
    assert sum(result["state_numel"] for result in ranks[:ranks_per_node]) == numel  # node 0 holds it all once
    ckpt = out / "nodes" / "ckpt"
    saved_state_files(str(ckpt), world)


# ---------------------------------------------------------------- in-process

@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)  # Accelerate keeps process-wide singletons
    GradientState._reset_state()


def test_prepare_without_distlion_is_accelerator_prepare(accelerator):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    prepared_model, prepared_optimizer = distlion.accelerate.prepare(accelerator, model, optimizer)
    assert prepared_model is model and prepared_optimizer.optimizer is optimizer
    assert accelerator._optimizers == [prepared_optimizer]
    assert not accelerator._save_model_state_pre_hook and not accelerator._load_model_state_pre_hook
    assert accelerator not in distlion.accelerate._ADAPTERS


def test_prepare_returns_what_accelerator_prepare_returns(accelerator):
    model = torch.nn.Linear(4, 2)
    optimizer = DistLion(model.parameters(), lr=1e-3)
    single = distlion.accelerate.prepare(accelerator, optimizer)
    assert single.optimizer is optimizer  # one object in, one object out, as accelerator.prepare
    assert distlion.unwrap(single) is optimizer  # through Accelerate's AcceleratedOptimizer
    assert distlion.accelerate.comm_metrics(single)["distlion/steps"] == 0
    with pytest.raises(TypeError, match="needs a DistLion optimizer"):
        distlion.accelerate.comm_metrics(torch.optim.SGD(model.parameters(), lr=0.1))


def test_unalias_keeps_every_view_of_a_flat_buffer():
    flat = torch.arange(10.0)
    state = {"a": flat[:4].view(2, 2), "b": flat[4:10], "own": torch.ones(3)}
    own = state["own"]
    distlion.accelerate._unalias(state)
    assert state["own"] is own  # a tensor with its own storage is left alone
    assert torch.equal(state["a"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(state["b"], flat[4:10])
    assert state["a"].untyped_storage().data_ptr() != state["b"].untyped_storage().data_ptr()
    assert state["a"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()


FSDP2_MESHES = {"own": ("replicate", "shard"), "accelerate": ("dp_replicate", "dp_shard")}


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
@pytest.mark.parametrize("mesh, vote_over", [("own", "device_mesh"), ("accelerate", "device_mesh"),
                                             ("accelerate", "process_group")])
def test_fsdp2_plugin_votes_across_nodes_and_resumes_exactly(tmp_path, mesh, vote_over):
    """Accelerate's FSDP2 plugin with launch/accelerate/fsdp2_2x8gpu.yaml's settings, as 2 nodes of 2 CPU ranks:
    the model is sharded inside each node, the nodes vote, save_state/load_state go through DCP.

    The mesh is the job's own or the one Accelerate builds from ParallelismConfig(dp_replicate_size=2,
    dp_shard_size=2); DistLion takes it as device_mesh, or its replicate dim's group as process_group."""
    config = ROOT / "launch" / "accelerate" / "fsdp2_2x8gpu.yaml"
    layout = ["--config_file", str(config), "--num_machines", "1", "--machine_rank", "0", "--main_process_ip",
              "127.0.0.1", "--rdzv_backend", "static"]
    result = launch_ok("--out", str(tmp_path), "--mesh", mesh, "--vote-over", vote_over, num_processes=4,
                       layout=layout, job=ROOT / "tests" / "accelerate_fsdp_job.py")
    assert "prepared without the DDP model" not in result.stderr  # there is no DDP model under FSDP2
    ranks = [torch.load(tmp_path / f"fsdp_rank{rank}.pt", weights_only=False) for rank in range(4)]
    first = ranks[0]
    assert first["mesh_dim_names"] == FSDP2_MESHES[mesh]
    assert first["is_fsdp2"] and first["distributed_type"] == "DistributedType.FSDP"
    assert "distlion_optimizer0_dcp" in first["saved"] and "optimizer_0" in first["saved"]
    for record in ranks:  # full parameters identical on every rank after every step
        assert all(torch.equal(a, b) for step, params in enumerate(record["params"])
                   for a, b in zip(params, first["params"][step]))
        # load_state(3), then steps 4-6 again: the same parameters, momentum and lr
        assert all(torch.equal(a, b) for a, b in zip(record["first"]["params"], record["resumed"]["params"]))
        assert all(torch.equal(a, b) for a, b in zip(record["first"]["momentum"], record["resumed"]["momentum"]))
        assert record["first"]["lr"] == record["resumed"]["lr"]
        assert record["comm"]["steps"] == 6 and record["comm"]["inter_node_bytes_sent"] > 0
    # the same shard on the two nodes: different gradients (no all-reduce across nodes), equal parameters
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["grads"][0], ranks[2]["grads"][0]))
    assert all((a != b).float().mean() > 0.5 for a, b in zip(first["params"][0], first["params"][-1]))  # trained


@pytest.mark.parametrize("is_fsdp2, expected", [(False, "not FSDP1"), (True, "shard the model over each node's ranks")])
def test_fsdp_plugin_without_a_presharded_model_is_an_error(is_fsdp2, expected):
    """Accelerate's own FSDP sharding would all-reduce across nodes first: prepare names what works."""
    from types import SimpleNamespace

    from distlion.accelerate import _check_supported

    accelerator = SimpleNamespace(distributed_type="FSDP", is_fsdp2=is_fsdp2, num_processes=1)
    optimizer = DistLion(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=expected) as error:
        _check_supported(accelerator, optimizer)
    assert "device_mesh=mesh" in str(error.value)


DEEPSPEED_CONFIGS = {  # accelerate_deepspeed_job.py's two ways in
    "entry": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1},
              "optimizer": {"type": "DistLion", "params": {"lr": "auto", "betas": [0.9, 0.99],
                                                           "weight_decay": "auto"}}},
    "client": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "zero_optimization": {"stage": 0}},
}


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
@pytest.mark.parametrize("way_in", sorted(DEEPSPEED_CONFIGS))
def test_deepspeed_plugin_votes_on_local_gradients_and_resumes_bitwise(tmp_path, way_in):
    """``accelerate launch --use_deepspeed``: a "DistLion" config entry (with DummyOptim) or a DistLion instance
    reaches DistLion with gradients left local; save_state / load_state keep every rank's state."""
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(DEEPSPEED_CONFIGS[way_in]))
    # launch/accelerate/deepspeed_2x8gpu.yaml's settings on one machine, with this test's DeepSpeed config
    layout = ["--config_file", str(ROOT / "launch" / "accelerate" / "deepspeed_2x8gpu.yaml"), "--num_machines", "1",
              "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--deepspeed_config_file", str(config)]
    # Accelerate falls back to DDP under ACCELERATE_USE_CPU; the job names gloo itself instead.
    result = run_bounded([*accelerate_command(), *layout, "--num_processes", str(WORLD), "--main_process_port",
                          str(free_port()), str(ROOT / "tests" / "accelerate_deepspeed_job.py"), "--optimizer",
                          way_in, "--out", str(tmp_path)],
                         {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}, LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"launch failed ({result.returncode}):\n{result.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"{way_in}_rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for record in ranks:
        assert record["is_distlion"] and record["engine_allreduce"] is False and record["world_size"] == WORLD
        assert record["grads_differ"] == [True] * 6, "DistLion's gradients were all-reduced"
        assert record["params_same"] == [True] * 6
        assert record["comm"]["steps"] == 6
        assert record["comm"]["bytes_sent"] == 6 * all_gather_bytes_per_step(record["numel"], WORLD)
        saved = [f for f in record["files"] if f.startswith("distlion_optimizer0_rank")]
        assert [f.split(".")[0] for f in saved] == [f"distlion_optimizer0_rank{r}_of_{WORLD}" for r in range(WORLD)]
        assert "distlion_optimizer0_manifest.json" in record["files"]
        # load_state after step 3 in fresh objects, steps 4-6 again: bitwise the same parameters
        assert all(torch.equal(a, b) for a, b in zip(record["params"], record["resumed_params"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
