"""Nodes vote: ranks_per_node = G on real gloo processes against the node-level simulation.

4 ranks as 2 x 2, 6 as 3 x 2 and 4 as 1 x 4: every rank, every step, both votes, both
exchanges and the scaled step, against ``simulation.simulate(..., ranks_per_node=G)``.
"""

import io
import os

import pytest
import torch
import torch.distributed as dist

from distlion import DistLion
from distlion.agreement import SUMMARY_BYTES
from distlion.topology import resolve_ranks_per_node
from multiprocess import run_ranks
from rank_checks import assert_every_rank_skipped_step_2, save_and_resume, train
from simulation import BETAS, LR, WD, _grads, _params, assert_equal_histories, simulate

STEPS = 5


def _train(rank, steps, style, vote, exchange, vote_ema_beta, ranks_per_node):
    history, opt = train(rank, steps, style, vote=vote, exchange=exchange, vote_ema_beta=vote_ema_beta,
                         ranks_per_node=ranks_per_node)
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values())
    return history, opt.comm_stats, state_numel, [b.padded_numel for b in opt.layout.buckets]


def _train_each(rank, world_size, combos):
    """One launch trains every combo: process start-up is the slow part."""
    return {combo: _train(rank, STEPS, *combo) for combo in combos}


def _check_against_simulation(world_size, ranks_per_node, combos):
    results = run_ranks(_train_each, world_size, combos, timeout=240)
    for combo in combos:
        style, vote, _, beta, _ = combo
        expected = simulate(world_size, STEPS, style, vote=vote, vote_ema_beta=beta, ranks_per_node=ranks_per_node)
        for per_rank in results:  # every rank holds the same replica, equal to the simulation
            assert_equal_histories(per_rank[combo][0], expected)
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_nodes_of_two_match_the_node_simulation():
    combos = [(style, vote, exchange, beta, 2) for style in ("dyadic", "ties") for vote in ("majority", "average")
              for exchange in ("two_phase", "all_gather") for beta in (None, 0.9)]
    results = _check_against_simulation(4, 2, combos)
    # the nodes' votes differ from a flat vote of the four ranks (the test can tell them apart)
    assert not torch.equal(simulate(4, STEPS, "dyadic")[-1][0], results[0][combos[0]][0][-1][0])
    # each rank holds the momentum of its half of the bucket: every coordinate once per node
    numel = sum(p.numel() for p in _params())
    for node in range(2):
        shares = [results[2 * node + j][combos[0]][2] for j in range(2)]
        padded = sum(results[0][combos[0]][3])
        assert sum(shares) == numel and max(shares) <= padded // 2


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_three_nodes_of_two_match_the_node_simulation():
    combos = [("dyadic", "majority", "two_phase", None, 2), ("dyadic", "average", "all_gather", None, 2),
              ("ties", "majority", "all_gather", 0.9, 2), ("ties", "average", "two_phase", 0.9, 2)]
    _check_against_simulation(6, 2, combos)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_one_node_of_four_is_lion_with_sharded_state():
    combos = [("dyadic", "majority", "auto", None, 4), ("dyadic", "majority", "auto", 0.9, 4)]
    results = _check_against_simulation(4, 4, combos)
    numel = sum(p.numel() for p in _params())
    assert sum(per_rank[combos[0]][2] for per_rank in results) == numel  # each coordinate's state on one rank
    for per_rank in results:
        history, stats, state_numel, padded = per_rank[combos[0]]
        assert state_numel <= sum(padded) // 4
        assert stats.inter_node_bytes_sent == 0  # one node: no 1-bit traffic
        assert stats.intra_node_bytes_sent > 0


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_one_rank_per_node_is_the_flat_vote():
    combos = [(style, "majority", "two_phase", None, 1) for style in ("random", "ties")]
    _check_against_simulation(4, 1, combos)


def _many_buckets(rank, world_size):
    history, opt = train(rank, STEPS, "dyadic", ranks_per_node=2, vote_ema_beta=0.9, bucket_cap_mb=10 * 4 / 2**20)
    return history, [bucket.numel for bucket in opt.layout.buckets]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_many_buckets_through_two_staging_buffers_match_the_simulation():
    results = run_ranks(_many_buckets, 4)
    sizes = results[0][1]
    assert len(sizes) == 3  # (33, 7) alone, (7,), then (5, 3): buckets reuse the two staging buffers in turn
    expected = simulate(4, STEPS, "dyadic", vote_ema_beta=0.9, ranks_per_node=2, bucket_sizes=sizes)
    for history, _ in results:
        assert_equal_histories(history, expected)


def _comm_stats(rank, world_size, ranks_per_node):
    return _train(rank, 3, "dyadic", "majority", "auto", None, ranks_per_node)[1]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_comm_stats_split_by_link_class():
    numel = sum(p.numel() for p in _params())
    padded = -(-numel // 256) * 256  # a multiple of 64 * N
    for stats in run_ranks(_comm_stats, 4, 2):
        chunk = padded // 2
        # two voters: the all-gather exchange of this rank's chunk (plus 8 header bytes), to the one other node
        assert stats.inter_node_bytes_sent == 3 * (chunk // 8 + 8)
        # reduce-scatter of fp32 gradients, all-gather of fp32 parameters, the step's agreement (skip, digest)
        assert stats.intra_node_bytes_sent == 3 * (chunk * 4 + chunk * 4 + SUMMARY_BYTES)
        assert stats.bytes_sent == stats.inter_node_bytes_sent + stats.intra_node_bytes_sent
        assert stats.allreduce_fp32_node_bytes == 3 * (2 * 3 * 4 * numel // 4)
        assert stats.ranks_per_node == 2
        expected = stats.allreduce_fp32_node_bytes / (2 * stats.inter_node_bytes_sent)
        assert stats.compression == pytest.approx(expected)  # the flag bytes weigh on so small a model


def _large_model_compression(rank, world_size, ranks_per_node):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    opt = DistLion(model.parameters(), ranks_per_node=ranks_per_node, exchange="two_phase")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.comm_stats.compression


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_by_two_sends_about_48x_fewer_inter_node_bytes():
    # per node across its boundary: DDP's ring 2(N-1)/N * 32 bits, the vote 2(M-1)/M bits per parameter
    for compression in run_ranks(_large_model_compression, 4, 2):
        assert 46 < compression <= 48


def _nonfinite_on_one_rank(rank, world_size):
    params = _params()
    opt = DistLion(params, lr=LR, weight_decay=WD, ranks_per_node=2)
    snapshots = []
    for step in range(1, 5):
        grads = _grads(rank, step, "dyadic")
        if step == 2 and rank == 3:
            grads[0][3, 3] = float("inf")  # in the chunk that local rank 0 owns
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        momentum = torch.cat([s["exp_avg"].reshape(-1) for s in opt.state.values()])
        snapshots.append(([p.detach().clone() for p in params], momentum.clone()))
    return snapshots, opt.comm_stats.skipped_steps


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_nonfinite_gradient_on_one_rank_makes_every_rank_of_every_node_skip():
    assert_every_rank_skipped_step_2(run_ranks(_nonfinite_on_one_rank, 4))


def _save_resume(rank, world_size, k):
    params_equal, state_equal, saved = save_and_resume(rank, k, "dyadic", vote_ema_beta=0.9, ranks_per_node=2)
    # the same file in a run of one rank per node: a clear error naming both topologies, on every rank
    state = torch.load(io.BytesIO(saved), weights_only=True)
    flat = DistLion([torch.nn.Parameter(t) for t in state["params"]], vote_ema_beta=0.9, ranks_per_node=1)
    try:
        flat.load_state_dict(state["opt"])
        error = None
    except ValueError as raised:
        error = str(raised)
    return params_equal and state_equal, error


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_exact_resume_and_topology_mismatch_error():
    for same, error in run_ranks(_save_resume, 4, 3):
        assert same
        assert "saved with world size 4 and ranks_per_node 2, but this run has world size 4 and ranks_per_node 1" \
            in error


def _bad_ranks_per_node(rank, world_size, per_rank):
    DistLion(_params(), ranks_per_node=per_rank[rank])


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_ranks_per_node_that_does_not_divide_is_an_error_on_every_rank():
    with pytest.raises(RuntimeError, match="ranks_per_node=4 does not divide the world size 6"):
        run_ranks(_bad_ranks_per_node, 6, [4] * 6, timeout=60)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_ranks_per_node_that_differs_between_ranks_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError) as error:
        run_ranks(_bad_ranks_per_node, 4, [2, 2, 2, 1], timeout=60)
    assert "ranks_per_node differs between ranks" in str(error.value)
    assert "rank 3: ranks_per_node 1" in str(error.value)


def _explicit_groups(rank, world_size):
    """Groups built by the caller: nodes {0, 1} and {2, 3}; voters {0, 2} and {1, 3}."""
    nodes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    voters = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    params = _params()
    opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, process_group=voters[rank % 2],
                   node_group=nodes[rank // 2])
    for step in range(1, STEPS + 1):
        for p, g in zip(params, _grads(rank, step, "dyadic")):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params], opt.ranks_per_node, opt.rank


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_explicit_node_and_vote_groups():
    expected = simulate(4, STEPS, "dyadic", ranks_per_node=2)[-1]
    for rank, (params, ranks_per_node, place) in enumerate(run_ranks(_explicit_groups, 4)):
        assert ranks_per_node == 2 and place == rank
        assert all(torch.equal(a, b) for a, b in zip(params, expected))


def _auto(rank, world_size, local_world_size):
    os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"] = str(world_size), str(local_world_size)
    return DistLion(_params()).ranks_per_node


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_auto_takes_the_local_world_size_when_the_job_spans_nodes():
    assert run_ranks(_auto, 4, 2) == [2] * 4


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 8),   # torchrun, Accelerate
    ({"WORLD_SIZE": "16", "LOCAL_SIZE": "8"}, 8),         # the DeepSpeed launcher
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 1),    # one node: every rank votes
    ({"WORLD_SIZE": "16"}, 1),                            # no node size: every rank votes
    ({"WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "8"}, 1),   # uneven nodes: every rank votes
])
def test_auto_reads_the_launchers_node_size(monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_ranks_per_node("auto", int(env["WORLD_SIZE"]), is_world=True) == expected
    assert resolve_ranks_per_node("auto", int(env["WORLD_SIZE"]), is_world=False) == 1  # a group of the caller's


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="Invalid ranks_per_node: 0"):
        DistLion(_params(), ranks_per_node=0)
    with pytest.raises(ValueError, match="ranks_per_node=2 needs torch.distributed"):
        DistLion(_params(), ranks_per_node=2)
    with pytest.raises(ValueError, match="Invalid reduce_dtype"):
        DistLion(_params(), reduce_dtype=torch.int32)
    assert DistLion(_params(), ranks_per_node="auto").ranks_per_node == 1
