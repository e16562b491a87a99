"""DistLion inside DeepSpeed (ZeRO stage 0) on 2 gloo CPU processes: tests/deepspeed_job.py.

Three launches serve all tests (DeepSpeed's import and init dominate the time): the
training launch (fp32, bf16, fp16 with an inf on rank 1, a checkpoint at step K), a
fresh launch that resumes from step K, and a 1-rank launch that loads the 2-rank
checkpoint. DeepSpeed refuses fp16 on CPUs without oneDNN fp16 kernels; the jobs lift
that capability check (torch runs fp16 on any CPU), so the loss-scaling path runs here.
"""

import inspect

import pytest
import torch

pytest.importorskip("deepspeed")

import deepspeed_job as job  # noqa: E402
from distlion import DistLion  # noqa: E402
from distlion.deepspeed import CONFIG_PARAMS, distlion_kwargs, initialize  # noqa: E402
from multiprocess import run_ranks  # noqa: E402

WORLD = 2
LAUNCH_TIMEOUT = 240  # seconds per launch; a hang fails instead of stalling CI
PRECISIONS = job.PRECISIONS


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("deepspeed_checkpoints"))


@pytest.fixture(scope="module")
def trained(checkpoint_root):
    return run_ranks(job.train_all, WORLD, checkpoint_root, timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def resumed(trained, checkpoint_root):
    return run_ranks(job.resume_all, WORLD, checkpoint_root, timeout=LAUNCH_TIMEOUT)


def _padded(numel: int, world_size: int) -> int:
    multiple = 64 * world_size
    return -(-numel // multiple) * multiple


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_config_entry_builds_distlion_with_gradients_left_local(trained, precision):
    for rank, result in enumerate(r[precision] for r in trained):
        assert result["hyperparameters"] == {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
        assert result["vote"] == "majority" and result["world_size"] == WORLD
        assert result["allreduce_enabled"] is False
        assert result["returned_optimizer_is_engine_optimizer"]
        assert result["unwrap_finds_distlion"]  # distlion.unwrap sees through the engine and its wrapper
        # fp32: DistLion is the engine's optimizer; bf16/fp16: DeepSpeed's wrapper around it.
        assert result["wrapper"] == ("DistLion" if precision == "fp32" else "FP16_UnfusedOptimizer")
        if precision != "fp16":  # fp16 gradients carry the loss scale
            for engine_grad, local_grad in zip(result["grads"]["engine"], result["grads"]["local"]):
                assert torch.equal(engine_grad, local_grad), f"rank {rank}: gradient is not the local one"
    rank0, rank1 = (r[precision]["grads"]["engine"] for r in trained)
    assert all(not torch.equal(a, b) for a, b in zip(rank0, rank1)), "gradients were all-reduced"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_parameters_identical_on_every_rank_after_every_step(trained, precision):
    rank0, rank1 = (r[precision] for r in trained)
    assert len(rank0["params"]) == 2 * job.K
    for step, (a, b, ma, mb) in enumerate(zip(rank0["params"], rank1["params"], rank0["masters"],
                                              rank1["masters"])):
        assert torch.equal(a, b), f"model parameters differ between ranks after step {step}"
        assert torch.equal(ma, mb), f"DistLion's parameters differ between ranks after step {step}"
    for step in range(1, 2 * job.K):
        moved = not torch.equal(rank0["params"][step], rank0["params"][step - 1])
        assert moved == (step != job.INF_STEP), f"step {step}: moved={moved}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ("bf16", "fp16"))
def test_wrapper_warm_up_step_is_undone(trained, precision):
    # DeepSpeed's wrapper steps once with zero gradients at init; training must start
    # from the model's weights, and comm_stats must count training steps only.
    result = trained[0][precision]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    assert torch.equal(result["initial_params"], result["model_init"].to(dtype).float())
    assert torch.equal(result["initial_masters"], result["initial_params"])
    assert result["steps_before_training"] == 0


@pytest.mark.timeout(300)
def test_fp32_engine_matches_distlion_without_deepspeed(trained):
    for result in trained:
        for step, (ds, plain) in enumerate(zip(result["fp32"]["params"], result["plain_fp32"])):
            assert torch.equal(ds, plain), f"step {step}: DeepSpeed changed DistLion's trajectory"


@pytest.mark.timeout(300)
def test_gradient_accumulation_exchanges_once_per_step(trained):
    for result in trained:
        run = result["accumulate"]
        assert run["exchanges"] == len(run["engine"]) == 2
        for step, (ds, plain) in enumerate(zip(run["engine"], run["plain"])):
            assert torch.equal(ds, plain), f"step {step}: accumulated update differs from DistLion alone"
    assert torch.equal(trained[0]["accumulate"]["engine"][-1], trained[1]["accumulate"]["engine"][-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_bytes_per_step_match_core_formula(trained, precision):
    for result in (r[precision] for r in trained):
        padded = _padded(result["numel"], WORLD)
        assert result["padded_numel"] == [padded]  # one bucket: one dtype, far below the cap
        per_step = (WORLD - 1) * (padded // 8 + 8)
        stats = result["comm_stats"]
        # fp32: every step reaches DistLion (it skips the inf step itself); bf16/fp16: the
        # wrapper skips the inf step before DistLion, so it exchanges one step fewer.
        assert stats["steps"] == 2 * job.K - (precision != "fp32")
        assert stats["bytes_sent_per_step"] == per_step
        assert stats["bytes_sent"] == stats["bytes_received"] == per_step * stats["steps"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_overflow_on_one_rank_skips_the_step_on_every_rank(trained, precision):
    rank0, rank1 = (r[precision] for r in trained)
    assert torch.equal(rank0["params"][job.INF_STEP], rank0["params"][job.INF_STEP - 1])
    after = [0] * job.INF_STEP + [1] * (2 * job.K - job.INF_STEP)  # skipped-step count after each step
    for result in (rank0, rank1):
        if precision == "fp32":
            assert result["distlion_skipped"] == after  # DistLion's flag rides with the signs
        else:
            assert result["skipped"] == after  # DeepSpeed's wrapper all-reduces its overflow flag
    assert rank0["loss_scale"] == rank1["loss_scale"]
    if precision == "fp16":
        scale = 2.0 ** 8
        assert rank0["loss_scale"] == [scale] * job.INF_STEP + [scale / 2] * (2 * job.K - job.INF_STEP)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_from_checkpoint_is_bitwise_identical(trained, resumed, precision):
    for rank in range(WORLD):
        full, again = trained[rank][precision], resumed[rank][precision]
        assert again["global_steps_loaded"] == job.K
        assert torch.equal(again["momentum_loaded"], full["momentum_at_k"]), f"rank {rank} got another momentum"
        for step, (a, b) in enumerate(zip(full["params"][job.K:], again["params"]), start=job.K):
            assert torch.equal(a, b), f"rank {rank}: parameters differ after step {step}"
        for a, b in zip(full["masters"][job.K:], again["masters"]):
            assert torch.equal(a, b)
        assert torch.equal(full["final"]["momentum"], again["final"]["momentum"])
        assert again["global_steps"] == full["global_steps"] == 2 * job.K
        assert again["comm_stats"] == full["comm_stats"]
        assert again["loss_scale"] == full["loss_scale"][job.K:]
        assert "optimizer" in again["client_state_keys"]
    # Momentum is per rank: loading rank 0's (all DeepSpeed saves) on rank 1 would be wrong.
    assert not torch.equal(trained[0][precision]["momentum_at_k"], trained[1][precision]["momentum_at_k"])


@pytest.mark.timeout(300)
def test_other_world_size_is_a_clear_error_and_weights_still_load(trained, checkpoint_root):
    (result,) = run_ranks(job.load_elsewhere, 1, checkpoint_root, timeout=LAUNCH_TIMEOUT)
    for precision in ("fp32", "bf16"):
        error = result[precision]["error"]
        assert error is not None and "2 rank(s)" in error and "this run has 1" in error
        assert "load_optimizer_states=False" in error
        # The weights alone load, and DistLion's copies follow them (no stale fp32 copies).
        at_k = trained[0][precision]["params"][job.K - 1]
        assert result[precision]["load_path"] is not None
        assert torch.equal(result[precision]["params"], at_k)
        assert torch.equal(result[precision]["state"]["params"], at_k)
        assert not result[precision]["state"]["momentum"].any()
    assert "No DistLion optimizer state for rank 0" in result["without_rank_files"]


@pytest.mark.timeout(300)
def test_shipped_config_from_launcher_args(trained):
    for result in trained:
        run = result["from_args"]
        assert run["args_config"] == run["path"]  # handed back to the caller's args
        assert run["lr"] == 1e-4 and run["allreduce_enabled"] is False and run["steps"] == 1
    assert torch.equal(trained[0]["from_args"]["params"], trained[1]["from_args"]["params"])


@pytest.mark.timeout(300)
def test_zero_stage_1_and_2_are_refused_on_every_rank(trained):
    for result in trained:  # both ranks raised and went on: nothing hung
        assert sorted(result["zero_errors"]) == [1, 2]
        for stage, message in result["zero_errors"].items():
            assert f"ZeRO stage {stage}" in message and '"stage": 0' in message
            assert "reduce-scatters full-precision gradients" in message


@pytest.mark.timeout(300)
def test_other_optimizers_pass_through(trained):
    for result in trained:
        assert result["adamw"] == {"optimizer": "AdamW", "allreduce_enabled": True}


@pytest.mark.timeout(60)
def test_zero_refusal_needs_no_process_group():
    config = job.ds_config("bf16", stage=1)
    with pytest.raises(ValueError, match="ZeRO stage 1"):
        initialize(model=job.build_model(), config=config)


@pytest.mark.timeout(60)
def test_config_params_are_checked():
    assert distlion_kwargs({"betas": [0.9, 0.98], "momentum_dtype": "bfloat16"}) == {
        "betas": (0.9, 0.98), "momentum_dtype": torch.bfloat16}
    with pytest.raises(ValueError, match=r"\['eps'\]"):
        distlion_kwargs({"lr": 1e-4, "eps": 1e-8})
    with pytest.raises(ValueError, match="'float33'"):
        distlion_kwargs({"momentum_dtype": "float33"})
    # The entry takes every DistLion argument a JSON file can hold (not the process group).
    arguments = set(inspect.signature(DistLion).parameters) - {"params", "process_group"}
    assert set(CONFIG_PARAMS) == arguments
