"""The per-step agreement (distlion.agreement): a rank that drifts makes every rank raise, naming what and where.

Each worker catches the error DistLion raises and returns its message, so a test sees
that every rank raised (and that every process came back) rather than one traceback.
"""

import logging

import pytest
import torch

from distlion import DistLion
from multiprocess import run_ranks
from simulation import _grads, _params

pytestmark = pytest.mark.multiprocess


def _train(rank, params, opt, steps, change=None):
    """Run ``steps`` steps; ``change(rank, step, params, opt)`` runs before each. Return the error's message."""
    try:
        for step in range(1, steps + 1):
            if change is not None:
                change(rank, step, params, opt)
            for p, g in zip(params, _grads(rank, step, "random")):
                p.grad = g.to(p.dtype) if p.requires_grad else None
            opt.step()
    except RuntimeError as error:
        return f"{type(error).__name__} at step {step}: {error}"
    return None


def _scheduler_on_one_rank(rank, world_size):
    params = _params()
    opt = DistLion(params, lr=0.01, timeout=30)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)

    def change(rank, step, params, opt):
        if rank == 1 and step == 3:
            scheduler.step()  # a scheduler stepped on one rank only
    return _train(rank, params, opt, 5, change)


def _weight_decay_on_one_rank(rank, world_size):
    params = _params()
    opt = DistLion(params, lr=0.01, weight_decay=0.1, timeout=30)

    def change(rank, step, params, opt):
        if rank == world_size - 1 and step == 2:
            opt.param_groups[0]["weight_decay"] = 0.2
    return _train(rank, params, opt, 4, change)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("job, field, world_size", [
    (_scheduler_on_one_rank, "param group 0 lr", 2),
    (_weight_decay_on_one_rank, "param group 0 weight_decay", 3),
])
def test_a_setting_changed_on_one_rank_raises_on_every_rank_naming_it(job, field, world_size):
    messages = run_ranks(job, world_size, timeout=120)
    assert all(m is not None and "settings differ between ranks" in m and field in m for m in messages), messages
    step = 3 if field.endswith("lr") else 2
    assert all(m.startswith(f"RuntimeError at step {step}") for m in messages), messages  # the step it happened


def _construction_error(params, **options):
    """The message of the error building DistLion raised (None: it was built)."""
    try:
        DistLion(params, timeout=30, **options)
    except RuntimeError as error:
        return str(error)
    return None


def _tensor_lr(rank, world_size):
    lr = torch.tensor(0.01 if rank == 0 else 0.01003)  # both print as tensor(0.0100)
    return _construction_error(_params(), lr=lr)


@pytest.mark.timeout(120)
def test_settings_are_compared_by_value_not_by_repr():
    messages = run_ranks(_tensor_lr, 2, timeout=90)
    assert all(m is not None and "param group 0 lr" in m for m in messages), messages


def _named_in_another_order(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    named = list(model.named_parameters())
    if rank == 1:
        named = [named[2], named[1], named[0], named[3]]  # same shapes, another order
    return _construction_error(named, lr=0.01)


@pytest.mark.timeout(120)
def test_named_parameters_in_another_order_are_refused():
    messages = run_ranks(_named_in_another_order, 2, timeout=90)
    assert all(m is not None and "parameter names" in m for m in messages), messages


def _layout_change_on_one_rank(rank, world_size, how):
    params = _params()
    opt = DistLion(params, lr=0.01, timeout=30)

    def change(rank, step, params, opt):
        if rank == 0 and step == 3:
            if how == "add_param_group":
                extra = torch.nn.Parameter(torch.zeros(16))
                params.append(extra)
                opt.add_param_group({"params": [extra]})
            elif how == "to_bfloat16":
                for p in params:
                    p.data = p.data.to(torch.bfloat16)
            else:
                params[0].requires_grad_(False)
    return _train(rank, params, opt, 5, change)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["add_param_group", "to_bfloat16", "requires_grad"])
def test_a_layout_change_on_one_rank_raises_on_every_rank_instead_of_aborting(how):
    messages = run_ranks(_layout_change_on_one_rank, 2, how, timeout=120)
    for message in messages:  # every process came back with DistLion's error, none was aborted by gloo
        assert message is not None and message.startswith("RuntimeError at step 3"), messages
        assert "the parameter layout or ranks_per_node differs between ranks" in message
        assert "-600" not in message  # no garbage read from a mismatched message


def _same_change_on_every_rank(rank, world_size, changed):
    params = _params()
    opt = DistLion(params, lr=0.01, timeout=30)

    def change(rank, step, params, opt):
        if changed and step == 3:
            params[1].requires_grad_(False)
    error = _train(rank, params, opt, 5, change)
    return error, [p.detach().clone() for p in params], opt.comm_stats.steps, opt.comm_stats.skipped_steps


@pytest.mark.timeout(180)
def test_the_same_layout_change_on_every_rank_applies_that_step():
    results = run_ranks(_same_change_on_every_rank, 2, True, timeout=120)
    assert all(error is None for error, *_ in results)
    (_, a, steps, skipped), (_, b, _, _) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and steps == 5 and skipped == 0
    unchanged = run_ranks(_same_change_on_every_rank, 2, False, timeout=120)[0][1]
    assert not torch.equal(a[1], unchanged[1])  # frozen from step 3: it kept its step-2 value


def _nan_parameter_on_one_rank(rank, world_size):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("distlion").addHandler(Keep())
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = DistLion(model.named_parameters(), lr=0.01, timeout=30)
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    for _ in range(12):
        (model(torch.randn(2, 8)) ** 2).sum().backward()  # the NaN reaches the gradients
        opt.step()
        opt.zero_grad()
    return records, opt.comm_stats.skipped_steps


@pytest.mark.timeout(120)
def test_a_nan_parameter_is_named_with_its_rank_and_the_stall_reported():
    results = run_ranks(_nan_parameter_on_one_rank, 2, timeout=90)
    (records0, skipped0), (records1, skipped1) = results
    assert skipped0 == skipped1 == 12
    assert any("rank 1 holds non-finite values" in r and "parameter weight (shape (4, 8)): values" in r
               for r in records1), records1
    assert any("voter(s) [1]" in r for r in records0), records0  # rank 0 is told which voter
    assert all(any("the run is stalled: every rank skipped the last 10 steps" in r for r in records)
               for records in (records0, records1))


def test_built_before_init_process_group_under_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4 .*init_process_group"):
        DistLion(_params())


def _scaler_and_scheduler(rank, world_size, agreed):
    import distlion

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = DistLion(model.parameters(), lr=0.01, timeout=30)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for step in range(1, 6):
        torch.manual_seed(rank * 100 + step)
        scaler.scale(model(torch.randn(2, 8)).pow(2).sum()).backward()
        if rank == 1 and step == 2:
            model.weight.grad[0, 0] = float("inf")  # an overflow on this rank only
        scale_before = scaler.get_scale()
        if agreed:
            distlion.scaler_step(scaler, opt)  # step and update
        else:
            scaler.step(opt)
            scaler.update()
        if scaler.get_scale() >= scale_before:  # the usual idiom: no scheduler step after a skipped step
            scheduler.step()
        opt.zero_grad()
    return scaler.get_scale(), opt.param_groups[0]["lr"], opt.comm_stats.skipped_steps


@pytest.mark.timeout(180)
def test_scaler_step_gives_every_rank_the_same_back_off():
    (scale0, lr0, skipped0), (scale1, lr1, skipped1) = run_ranks(_scaler_and_scheduler, 2, True, timeout=120)
    assert skipped0 == skipped1 == 1
    assert scale0 == scale1 == 2.0 ** 15 and lr0 == lr1
    # plain scaler.step: only the overflowing rank backs off; the idiom then steps the lr on rank 0 only,
    # and the per-step agreement stops the run on every rank instead of letting the replicas drift
    with pytest.raises(RuntimeError, match="settings differ between ranks.*param group 0 lr"):
        run_ranks(_scaler_and_scheduler, 2, False, timeout=120)


@pytest.mark.timeout(120)
def test_built_before_init_process_group_under_torchrun_fails_every_rank_and_the_launch_ends():
    import os
    import sys

    from launchers import free_port, run_bounded

    build = "import torch, distlion; distlion.DistLion([torch.nn.Parameter(torch.zeros(3))])"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--no-python", sys.executable, "-c", build]
    result = run_bounded(command, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=90)
    assert result.returncode != 0
    assert result.stderr.count("WORLD_SIZE=2 says this is one of 2 ranks") == 2, result.stderr[-2000:]
