"""DistLion inside DeepSpeed on gloo CPU processes: tests/deepspeed_job.py.

Five launches serve all tests (DeepSpeed's import and init dominate the time): the
training launch on 2 ranks at ZeRO stage 0 (fp32, bf16, fp16 with an inf on rank 1, a
checkpoint at step K), a fresh launch that resumes from step K, a 1-rank launch that
loads the 2-rank checkpoint, a 2-rank launch that loads crafted model-states files, and a
4-rank launch of 2 nodes of 2 under ZeRO stage 1 and 2 configs (train, checkpoint,
resume, another ranks_per_node, stage 3). DeepSpeed refuses
fp16 on CPUs without oneDNN fp16 kernels; the jobs lift that capability check (torch runs
fp16 on any CPU), so the loss-scaling path runs here.
"""

import inspect
import os

import pytest
import torch

pytest.importorskip("deepspeed")

import deepspeed_job as job  # noqa: E402
from distlion import DistLion  # noqa: E402
from distlion.deepspeed import CONFIG_PARAMS, _at_stage_zero, distlion_kwargs, initialize  # noqa: E402
from multiprocess import run_ranks  # noqa: E402

pytestmark = pytest.mark.integration

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
@pytest.mark.parametrize("launch, run", [("trained", "fp32"), ("nodes", "zero1_fp32")])
def test_fp32_engine_matches_distlion_without_deepspeed(request, launch, run):
    for result in request.getfixturevalue(launch):  # "nodes": ZeRO stage 1, ranks_per_node=2 on both sides
        for step, (ds, plain) in enumerate(zip(result[run]["params"], result["plain_fp32"])):
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
def test_other_world_size_maps_the_momenta_with_or_without_deepspeed(trained, checkpoint_root):
    (result,) = run_ranks(job.load_elsewhere, 1, checkpoint_root, timeout=LAUNCH_TIMEOUT)
    mean = (trained[0]["fp32"]["momentum_at_k"] + trained[1]["fp32"]["momentum_at_k"]) / 2
    assert result["fp32"]["error"] is None
    torch.testing.assert_close(result["fp32"]["loaded_momentum"], mean, rtol=0, atol=1e-7)
    # DeepSpeed's files load into DistLion alone, and DistLion alone's into the engine, alike
    assert torch.equal(result["alone_from_deepspeed"], result["fp32"]["loaded_momentum"])
    assert torch.equal(result["deepspeed_from_alone"], result["alone_from_deepspeed"])
    error = result["bf16"]["error"]  # a wrapper's state nests DistLion's: its own topology only
    assert error is not None and "holds a wrapper's optimizer state (DeepSpeed's bf16/fp16" in error
    assert "resume on world size 2" in error
    for precision in ("fp32", "bf16"):
        # The weights alone load, and DistLion's copies follow them (no stale fp32 copies).
        at_k = trained[0][precision]["params"][job.K - 1]
        assert result[precision]["load_path"] is not None
        assert torch.equal(result[precision]["params"], at_k)
        assert torch.equal(result[precision]["state"]["params"], at_k)
        assert not result[precision]["state"]["momentum"].any()
    assert "No DistLion optimizer state for rank 0" in result["without_rank_files"]


@pytest.mark.timeout(300)
def test_a_checkpoint_that_would_run_code_is_refused_on_every_rank(tmp_path):
    results = run_ranks(job.load_crafted, WORLD, str(tmp_path), timeout=LAUNCH_TIMEOUT)
    assert not (tmp_path / job.MARKER).exists(), "loading the checkpoint ran code from it"
    refused = f"{job.MODEL_STATES} holds a pickled {os.system.__module__}.system, which torch.load(weights_only=True)"
    for rank, result in enumerate(results):
        for form in job.CRAFTED:
            assert result[form]["error"] == "ValueError", (rank, form, result[form])
            assert refused in result[form]["message"] and "safe_globals" in result[form]["message"]
        assert result["reader_restored"]  # DeepSpeed's own reader is back after the load
        assert result["ranks_after"] == WORLD


@pytest.mark.timeout(300)
def test_shipped_config_from_launcher_args(trained):
    for result in trained:
        run = result["from_args"]
        assert run["args_config"] == run["path"]  # handed back to the caller's args
        assert run["lr"] == 1e-4 and run["allreduce_enabled"] is False and run["steps"] == 1
    assert torch.equal(trained[0]["from_args"]["params"], trained[1]["from_args"]["params"])


@pytest.mark.timeout(300)
def test_zero2_on_one_node_warns_that_ranks_per_node_would_leave_no_vote(trained):
    """One node: ranks_per_node = its size shards the state but leaves one voter, so the advice is not to set it."""
    for result in trained:
        run = result["zero2_one_node"]
        assert run["ranks_per_node"] == 1
        (warning,) = run["warnings"]
        assert f"The {WORLD} ranks are one node" in warning
        assert "sharded Lion with no vote and no inter-node link to save" in warning
        assert "Keep ranks_per_node 1 for the 1-bit vote" in warning
        assert "to shard it within a node" not in warning  # the old advice, which removed the vote


@pytest.mark.timeout(300)
def test_other_optimizers_pass_through(trained):
    for result in trained:
        assert result["adamw"] == {"optimizer": "AdamW", "allreduce_enabled": True}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zero, refused", [({"stage": 3}, "ZeRO stage 3"),
                                           ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer"),
                                           ({"stage": 1, "cpu_offload": True}, "cpu_offload")])
def test_zero_stage_3_and_offload_are_refused_without_a_process_group(zero, refused):
    config = {**job.ds_config("bf16"), "zero_optimization": zero}
    with pytest.raises(ValueError, match=refused) as error:
        initialize(model=job.build_model(), config=config)
    if zero["stage"] == 3:
        assert "not support" in str(error.value) and "FSDP2 (torch.distributed.fsdp.fully_shard)" in str(error.value)


@pytest.mark.timeout(60)
def test_import_registers_distlion_with_deepspeed_initialize():
    """Callers of deepspeed.initialize (Accelerate, Trainer) reach distlion's; a reload keeps DeepSpeed's own."""
    import importlib

    import deepspeed

    import distlion.deepspeed
    assert deepspeed.initialize is initialize
    own = distlion.deepspeed._deepspeed_initialize
    assert own.__module__.startswith("deepspeed") and own is not initialize
    reloaded = importlib.reload(distlion.deepspeed)
    try:
        assert deepspeed.initialize is reloaded.initialize and reloaded._deepspeed_initialize is own
    finally:
        deepspeed.initialize = initialize  # this module's names stay the ones the other tests imported


def test_zero_stages_run_deepspeed_at_stage_0():
    config = {**job.ds_config("bf16"), "zero_optimization": {"stage": 2, "overlap_comm": True}}
    assert _at_stage_zero(config) == {**config, "zero_optimization": {"stage": 0}}
    assert config["zero_optimization"]["stage"] == 2  # the caller's config is left alone
    assert _at_stage_zero({"zero_optimization": True})["zero_optimization"] == {"stage": 0}


@pytest.mark.timeout(60)
def test_config_params_are_checked():
    assert distlion_kwargs({"betas": [0.9, 0.98], "momentum_dtype": "bfloat16", "reduce_dtype": "torch.float32",
                            "ranks_per_node": "auto"}) == {
        "betas": (0.9, 0.98), "momentum_dtype": torch.bfloat16, "reduce_dtype": torch.float32,
        "ranks_per_node": "auto"}
    with pytest.raises(ValueError, match=r"\['eps'\]"):
        distlion_kwargs({"lr": 1e-4, "eps": 1e-8})
    for key in ("momentum_dtype", "reduce_dtype"):
        with pytest.raises(ValueError, match=f"{key} 'float33'"):
            distlion_kwargs({key: "float33"})
    with pytest.raises(ValueError, match="ranks_per_node"):
        distlion_kwargs({"ranks_per_node": 0})
    # The entry takes every DistLion argument a JSON file can hold (not the process groups, a device mesh or a quorum).
    arguments = set(inspect.signature(DistLion).parameters) - {"params", "process_group", "node_group", "device_mesh",
                                                                "quorum"}
    assert set(CONFIG_PARAMS) == arguments


# ------------------------------------------------- ZeRO 1 / 2: 2 nodes of 2 ranks

NODE_WORLD = 4


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    return run_ranks(job.nodes_all, NODE_WORLD, str(tmp_path_factory.mktemp("deepspeed_nodes")),
                     timeout=LAUNCH_TIMEOUT)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", job.NODE_RUNS)
def test_zero_configs_train_with_state_sharded_in_the_node(nodes, run):
    flat = [result["flat"]["state_numel"] for result in nodes]
    for rank, result in enumerate(r[run] for r in nodes):
        assert result["ranks_per_node"] == job.NODE_RANKS  # zero2_bf16: "auto" from the launcher's LOCAL_SIZE
        assert result["deepspeed_stage"] == 0
        assert result["state_numel"] <= flat[rank] // 2 + 64, f"rank {rank} holds more than half of the state"
    for node in range(NODE_WORLD // job.NODE_RANKS):  # the node's ranks hold every coordinate's state once
        ranks = range(node * job.NODE_RANKS, (node + 1) * job.NODE_RANKS)
        assert sum(nodes[r][run]["state_numel"] for r in ranks) == flat[0]
    for step in range(2 * job.K):
        for other in nodes[1:]:
            assert torch.equal(other[run]["params"][step], nodes[0][run]["params"][step]), f"step {step}"
            assert torch.equal(other[run]["masters"][step], nodes[0][run]["masters"][step]), f"step {step}"
    assert not torch.equal(nodes[0][run]["params"][-1], nodes[0][run]["params"][0])
    stats = nodes[0][run]["comm_stats"]
    assert stats["ranks_per_node"] == job.NODE_RANKS
    assert stats["inter_node_bytes_sent"] > 0 and stats["intra_node_bytes_sent"] > 0
    assert any(f"config ZeRO stage {job.NODE_RUNS[run][2]}, DeepSpeed runs at stage 0" in line and
               f"ranks_per_node={job.NODE_RANKS}" in line for line in nodes[0]["logs"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", job.NODE_RUNS)
def test_zero_configs_resume_bit_for_bit(nodes, run):
    for rank, result in enumerate(r[run] for r in nodes):
        again = result["resumed"]
        for step, (a, b) in enumerate(zip(result["params"][job.K:], again["params"]), start=job.K):
            assert torch.equal(a, b), f"rank {rank}: parameters differ after step {step}"
        assert torch.equal(result["final"]["momentum"], again["final"]["momentum"])
        assert again["comm_stats"] == result["comm_stats"] and again["loss_scale"] == result["loss_scale"][job.K:]


@pytest.mark.timeout(300)
def test_zero_resume_with_another_ranks_per_node_maps_the_momenta(nodes):
    """The ZeRO-1 checkpoint of 2 nodes of 2, resumed flat (4 voters): every voter the nodes' mean, in the
    engine and in DistLion alone."""
    flat = [result["flat"] for result in nodes]
    assert all(entry["load_error"] is None for entry in flat), [entry["load_error"] for entry in flat]
    assert all(torch.equal(entry["momentum"], flat[0]["momentum"]) for entry in flat)
    assert all(torch.equal(entry["alone_momentum"], entry["momentum"]) for entry in flat)
    assert flat[0]["momentum"].any()


@pytest.mark.timeout(300)
def test_zero_stage_3_is_refused_on_every_rank(nodes):
    for result in nodes:
        assert "ZeRO stage 3" in result["stage3_error"] and "fully_shard" in result["stage3_error"]
