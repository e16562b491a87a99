"""DistLion on real gloo processes (2-4 ranks) against a simulation written from the formulas."""

import io
import math

import pytest
import torch
import torch.distributed as dist

from distlion import DistLion
from multiprocess import run_ranks
from rank_checks import assert_every_rank_skipped_step_2, save_and_resume, train
from simulation import LR, SHAPES, WD, _grads, _params, assert_equal_histories, simulate

pytestmark = pytest.mark.multiprocess


def _train(rank, world_size, steps, style, vote, exchange, vote_ema_beta=None):
    history, opt = train(rank, steps, style, vote=vote, exchange=exchange, vote_ema_beta=vote_ema_beta)
    return history, opt.comm_stats, [b.padded_numel for b in opt.layout.buckets]


def _train_each(rank, world_size, steps, combos):
    """Train once per (style, vote, exchange[, vote_ema_beta]) in one launch: process start-up is the slow part."""
    return {combo: _train(rank, world_size, steps, *combo) for combo in combos}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [3, 4])
def test_matches_simulation_and_ranks_stay_identical(world_size):
    combos = [(style, "majority", exchange) for style in ("random", "ties") for exchange in ("two_phase", "all_gather")]
    results = run_ranks(_train_each, world_size, 6, combos)
    for style, vote, exchange in combos:
        expected = simulate(world_size, 6, style)
        for per_rank in results:  # every rank, every step
            assert_equal_histories(per_rank[style, vote, exchange][0], expected)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_average_vote_matches_simulation(world_size):
    expected = simulate(world_size, 5, "ties", vote="average")
    combos = [("ties", "average", exchange) for exchange in ("two_phase", "all_gather")]
    for per_rank in run_ranks(_train_each, world_size, 5, combos):
        for combo in combos:
            assert_equal_histories(per_rank[combo][0], expected)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_scaled_step_matches_simulation(world_size):
    combos = [("ties", vote, exchange, 0.9) for vote in ("majority", "average")
              for exchange in ("two_phase", "all_gather")] + [("random", "majority", "two_phase", 0.5)]
    results = run_ranks(_train_each, world_size, 6, combos)
    for style, vote, exchange, beta in combos:
        expected = simulate(world_size, 6, style, vote=vote, vote_ema_beta=beta)
        plain = simulate(world_size, 6, style, vote=vote)
        assert not torch.equal(expected[-1][0], plain[-1][0])  # the scaling changed the steps
        for per_rank in results:
            assert_equal_histories(per_rank[style, vote, exchange, beta][0], expected)


def _expected_bytes_per_step(world_size, padded, exchange, planes):
    """docs/design.md §2 per bucket, plus 8 flag bytes per message."""
    total = 0
    for numel in padded:
        nbytes = numel // 8
        if exchange == "two_phase":
            chunk = nbytes // world_size
            total += (world_size - 1) * (chunk + 8) + (world_size - 1) * planes * chunk
        else:
            total += (world_size - 1) * (nbytes + 8)
    return total


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_comm_stats_follow_the_formulas(world_size):
    numel = sum(math.prod(s) for s in SHAPES)
    combos = [("random", vote, exchange) for vote in ("majority", "average") for exchange in ("two_phase", "all_gather")]
    results = run_ranks(_train_each, world_size, 3, combos)
    for _, vote, exchange in combos:
        planes = 1 if vote == "majority" else math.ceil(math.log2(world_size + 1))
        for per_rank in results:
            _, stats, padded = per_rank["random", vote, exchange]
            assert padded == [-(-numel // (64 * world_size)) * 64 * world_size]
            per_step = _expected_bytes_per_step(world_size, padded, exchange, planes)
            assert stats.steps == 3
            assert stats.bytes_sent == stats.bytes_received == 3 * per_step
            assert stats.allreduce_fp32_bytes == 3 * (2 * (world_size - 1) * 4 * numel // world_size)


def _large_model_stats(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    opt = DistLion(model.parameters(), bucket_cap_mb=1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.comm_stats, len(opt.layout.buckets)


@pytest.mark.timeout(300)
def test_bytes_are_about_32x_fewer_than_fp32_allreduce():
    for stats, buckets in run_ranks(_large_model_stats, 4):
        assert buckets > 1  # one collective per bucket, several buckets
        assert 30 < stats.compression <= 32  # two-phase: 2(N-1)/N bits vs 64(N-1)/N bits per parameter


def _nonfinite_on_one_rank(rank, world_size, use_scaler):
    params = _params()
    opt = DistLion(params, lr=LR, weight_decay=WD)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
    snapshots = []
    for step in range(1, 5):
        grads = _grads(rank, step, "random")
        if step == 2 and rank == world_size - 1:
            grads[0][3, 3] = float("inf")
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grads))  # its gradient is g
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        snapshots.append(([p.detach().clone() for p in params], opt.state[params[0]]["exp_avg"].clone()))
    return snapshots, opt.comm_stats.skipped_steps


@pytest.mark.timeout(300)
@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "grad_scaler"])
def test_nonfinite_gradient_on_one_rank_makes_every_rank_skip(use_scaler):
    assert_every_rank_skipped_step_2(run_ranks(_nonfinite_on_one_rank, 3, use_scaler))


def _save_resume(rank, world_size, k, vote_ema_beta=None):
    return save_and_resume(rank, k, "random", vote_ema_beta=vote_ema_beta)


@pytest.mark.timeout(300)
def test_state_dict_round_trip_with_the_scaled_step():
    results = run_ranks(_save_resume, 2, 4, 0.9)
    for params_equal, state_equal, _ in results:
        assert params_equal and state_equal
    saved = torch.load(io.BytesIO(results[0][2]), weights_only=True)
    assert set(saved["opt"]["state"][0]) == {"exp_avg", "vote_ema"} and saved["opt"]["state"][0]["vote_ema"].any()


@pytest.mark.timeout(300)
def test_state_dict_round_trip_and_wrong_world_size():
    results = run_ranks(_save_resume, 2, 4)
    for params_equal, momentum_equal, _ in results:
        assert params_equal and momentum_equal
    saved = torch.load(io.BytesIO(results[1][2]), weights_only=True)
    assert saved["opt"]["distlion"]["rank"] == 1 and saved["opt"]["distlion"]["world_size"] == 2
    single = DistLion([torch.nn.Parameter(t) for t in saved["params"]])  # no process group: world size 1
    with pytest.raises(ValueError, match="saved with world size 2 and ranks_per_node 1, but this run has world size 1 and"):
        single.load_state_dict(saved["opt"])


def _mismatched_layout(rank, world_size):
    shapes = [(4, 4), (4,)] if rank == 0 else [(4, 4), (4,), (2,)]
    DistLion([torch.nn.Parameter(torch.zeros(s)) for s in shapes])


def _settings_differ(rank, world_size):
    DistLion(_params(), lr=0.01 if rank == 0 else 0.02, vote="majority" if rank < 2 else "average")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker, world_size, expected", [
    (_mismatched_layout, 2, ["parameter layout or ranks_per_node differs between ranks",
                             "rank 0: ranks_per_node 1, 2 parameters, 20 elements",
                             "rank 1: ranks_per_node 1, 3 parameters, 22 elements"]),
    (_settings_differ, 3, ["settings differ between ranks", "vote (here", "ranks [2] differ from rank 0",
                           "param group 0 lr", "ranks [1, 2] differ from rank 0"]),
], ids=["layout", "settings"])
def test_mismatch_between_ranks_is_a_clear_error_not_a_hang(worker, world_size, expected):
    with pytest.raises(RuntimeError) as error:
        run_ranks(worker, world_size, timeout=60)
    for part in expected:
        assert part in str(error.value)


def _rank_in_group(rank, world_size):
    return dist.get_rank(), DistLion(_params()).world_size


@pytest.mark.timeout(120)
def test_default_group_is_the_world():
    assert run_ranks(_rank_in_group, 2) == [(0, 2), (1, 2)]
