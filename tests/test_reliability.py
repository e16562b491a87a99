"""Defects a careless or hostile user meets: each is an error naming the value, or handled, never silent."""

import copy
import os
import signal
import time
import warnings

import pytest
import torch

from distlion import DistLion
from multiprocess import run_ranks
from simulation import _grads, _params


def _bf16_model():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64).to(torch.bfloat16)


def _step(model, opt):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


def test_master_weights_follow_weights_loaded_after_construction():
    model = _bf16_model()
    opt = DistLion(model.parameters(), lr=1e-3)
    model.load_state_dict({k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()})
    _step(model, opt)
    # one step of lr from the loaded 0.5, not a jump back to the initial weights
    assert (model.weight.float() - 0.5).abs().max().item() <= 2e-3


def test_master_weights_follow_reinitialisation_and_replaced_data():
    model = _bf16_model()
    opt = DistLion(model.parameters(), lr=1e-3)
    _step(model, opt)
    with torch.no_grad():
        torch.nn.init.zeros_(model.bias)                            # in place
    model.weight.data = torch.full_like(model.weight, 0.25)         # replaced: a re-layout
    _step(model, opt)
    assert model.bias.float().abs().max().item() <= 2e-3
    assert (model.weight.float() - 0.25).abs().max().item() <= 2e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=float("inf")), "Invalid learning rate: inf"),
    (dict(lr=True), "Invalid learning rate: True"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(weight_decay=float("inf")), "Invalid weight_decay value: inf"),
    (dict(betas=None), "Invalid betas: None"),
    (dict(betas=(0.9, "0.99")), "Invalid beta parameter at index 1: '0.99'"),
])
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DistLion(_params(), **kwargs)


def test_add_param_group_is_checked_and_leaves_the_optimizer_unchanged():
    opt = DistLion(_params())
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": float("nan")})
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        opt.add_param_group({"params": [opt.param_groups[0]["params"][0]]})
    assert len(opt.param_groups) == 1


def test_duplicate_parameter_is_an_error_naming_shape_and_positions():
    params = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate first
        with pytest.raises(ValueError, match=r"shape \(7,\) is listed twice, at positions 1 and 3"):
            DistLion([*params, params[1]])


def test_meta_parameters_are_refused_at_construction():
    with pytest.raises(ValueError, match="is on the meta device: materialise the model first"):
        DistLion([torch.nn.Parameter(torch.zeros(4, device="meta"))])


def _trained_state():
    params = _params()
    opt = DistLion(params, lr=0.01, weight_decay=0.1)
    for step in (1, 2):
        for p, g in zip(params, _grads(0, step, "random")):
            p.grad = g
        opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["param_groups"][0].update(lr=float("nan")), "bad param group 0: Invalid learning rate: nan"),
    (lambda s: s["state"].pop(1), "parameter 1 .* holds None"),
    (lambda s: s["state"][0].update(exp_avg=torch.zeros(7)), r"is torch.float32 \(7,\), expected .* \(33, 7\)"),
    (lambda s: s["state"][2].update(exp_avg=torch.zeros(1)), r"expected a floating tensor of shape \(5, 3\)"),
    (lambda s: s["state"][0]["exp_avg"].__setitem__((0, 0), float("nan")), "holds inf or nan"),
])
def test_load_state_dict_refuses_damaged_state(damage, message):
    state = _trained_state()
    damaged = copy.deepcopy(state)
    damage(damaged)
    opt = DistLion(_params(), lr=0.01, weight_decay=0.1)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(damaged)
    opt.load_state_dict(state)  # the intact state loads


def _different_initial_values(rank, world_size, ranks_per_node):
    params = _params(seed=rank)  # as if each rank had seeded its model differently
    DistLion(params, ranks_per_node=ranks_per_node)
    return [p.detach().clone() for p in params]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_initial_parameters_are_rank_zeros_on_every_rank(ranks_per_node):
    expected = [p.detach() for p in _params(seed=0)]
    for params in run_ranks(_different_initial_values, 4, ranks_per_node):
        assert all(torch.equal(a, b) for a, b in zip(params, expected))


def _killed_mid_training(rank, world_size, ranks_per_node):
    params = _params()
    opt = DistLion(params, lr=0.01, timeout=20, ranks_per_node=ranks_per_node)
    for step in range(1, 6):
        if step == 3 and rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        for p, g in zip(params, _grads(rank, step, "random")):
            p.grad = g
        opt.step()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size, ranks_per_node", [(3, 1), (4, 2)], ids=["flat", "nodes"])
def test_a_killed_rank_makes_the_survivors_fail_with_a_clear_message(world_size, ranks_per_node):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        run_ranks(_killed_mid_training, world_size, ranks_per_node, timeout=60)
    assert time.monotonic() - start < 60
    message = str(error.value)
    assert "CollectiveError" in message and "another rank exited or crashed" in message


def _uneven_steps(rank, world_size):
    params = _params()
    opt = DistLion(params, lr=0.01, timeout=5)
    for step in range(1, 3 + (rank == 0)):  # rank 0 has one batch more
        for p, g in zip(params, _grads(rank, step, "random")):
            p.grad = g
        opt.step()
    if rank == 1:
        time.sleep(30)  # rank 1 goes on to other work; rank 0 waits in its extra step


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_uneven_steps_time_out_with_the_likely_cause():
    with pytest.raises(RuntimeError) as error:
        run_ranks(_uneven_steps, 2, timeout=60)
    message = str(error.value)
    assert "rank 0 failed" in message and "did not finish within 5 s" in message
    assert "different numbers of steps" in message


def test_timeout_is_checked():
    with pytest.raises(ValueError, match="Invalid timeout: -1"):
        DistLion(_params(), timeout=-1)


def _freeze_and_unfreeze(rank, world_size):
    params = _params()
    params[2].requires_grad_(False)  # frozen at construction
    opt = DistLion(params, lr=0.01, weight_decay=0.1)
    snapshots = []
    for step in range(1, 6):
        if step == 3:
            params[0].requires_grad_(False)  # frozen later, on every rank
            params[2].requires_grad_(True)   # unfrozen later
        for p, g in zip(params, _grads(rank, step, "random")):
            p.grad = g if p.requires_grad else None
        opt.step()
        snapshots.append([p.detach().clone() for p in params])
    return snapshots


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_requires_grad_changed_after_construction_behaves_like_torch_optim():
    initial = [p.detach() for p in _params()]
    results = run_ranks(_freeze_and_unfreeze, 2)
    for snapshots in results:
        assert torch.equal(snapshots[1][2], initial[2])           # frozen at construction: still
        assert torch.equal(snapshots[4][0], snapshots[1][0])      # frozen after step 2: still since
        assert not torch.equal(snapshots[4][2], initial[2])       # unfrozen at step 3: trains
        assert not torch.equal(snapshots[4][1], snapshots[1][1])  # the others train on
    assert all(torch.equal(a, b) for a, b in zip(results[0][4], results[1][4]))  # replicas identical


def test_float16_momentum_overflow_is_reported_once(caplog):
    params = [torch.nn.Parameter(torch.zeros(64))]
    opt = DistLion(params, momentum_dtype=torch.float16)
    with caplog.at_level("WARNING", logger="distlion.optim"):
        for _ in range(3):
            params[0].grad = torch.full((64,), 1e7)  # finite in fp32, beyond float16's range in the momentum
            opt.step()
    warnings_seen = [r for r in caplog.records if "float16 momentum of bucket 0 overflowed" in r.getMessage()]
    assert len(warnings_seen) == 1 and "momentum_dtype=torch.bfloat16" in warnings_seen[0].getMessage()


def _one_rank_moves_its_parameters(rank, world_size, move):
    params = _params()
    opt = DistLion(params, lr=0.01, timeout=30)
    for step in range(1, 4):
        if move and step == 2 and rank == 0:
            for p in params:
                p.data = p.data.clone()  # what model.to(device) does, on this rank alone
        for p, g in zip(params, _grads(rank, step, "random")):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_one_rank_moving_its_parameters_re_lays_out_alone():
    moved = run_ranks(_one_rank_moves_its_parameters, 2, True)
    still = run_ranks(_one_rank_moves_its_parameters, 2, False)
    for params in moved:
        assert all(torch.equal(a, b) for a, b in zip(params, still[0]))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout, ranks", [("flat", 2), ("nodes", 4), ("fsdp", 4)])
def test_a_rank_that_raises_exits_and_the_launcher_returns(layout, ranks):
    import sys

    from launchers import free_port, run_bounded

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "tests/uneven_job.py",
               "--layout", layout]
    start = time.monotonic()
    result = run_bounded(command, env, timeout=100)  # the other ranks stay alive 120 s: rank 0 must end it
    assert result.returncode != 0 and "CollectiveError" in result.stderr and "within 5 s" in result.stderr
    assert time.monotonic() - start < 100
