"""Momentum sync (``momentum_sync_every``) on real gloo processes, against runs without it.

Between syncs a run with the sync equals one without it bit for bit; at a sync every
voter's momentum becomes the same bf16 mean of the voters' momenta; the bytes are the
vote's plus a bf16 ring all-reduce per sync; parameters stay identical on every rank.
"""

import pytest
import torch

from distlion import DistLion
from distlion.comm import ring_allreduce_bytes
from multiprocess import run_ranks
from simulation import SHAPES, _grads, _params

EVERY, STEPS = 3, 7  # syncs after steps 3 and 6


def _momenta(opt: DistLion) -> torch.Tensor:
    return torch.cat([momentum.clone() for momentum in opt.layout.momenta()])


def _run(rank: int, world_size: int, every: int | None, ranks_per_node: int) -> dict:
    params = _params()
    opt = DistLion(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, ranks_per_node=ranks_per_node,
                   momentum_sync_every=every)
    after, history = [], []
    for step in range(STEPS):
        for param, grad in zip(params, _grads(rank, step, "random")):
            param.grad = grad
        opt.step()
        after.append(_momenta(opt))
        history.append([p.detach().clone() for p in params])
    return {"momenta": after, "params": history, "bytes": opt.comm_stats.as_dict(), "chunk": _momenta(opt).numel()}


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size, ranks_per_node", [(3, 1), (4, 2)])
def test_momentum_sync_averages_every_k_steps_and_nothing_else(world_size, ranks_per_node):
    synced = run_ranks(_run, world_size, EVERY, ranks_per_node, timeout=200)
    plain = run_ranks(_run, world_size, None, ranks_per_node, timeout=200)
    voters = world_size // ranks_per_node
    for step in range(STEPS):
        for rank in range(world_size):  # replicas identical on every step
            assert all(torch.equal(a, b) for a, b in zip(synced[rank]["params"][step], synced[0]["params"][step]))
        if step < EVERY:  # up to the first sync (which ends step EVERY): bit for bit the run without it
            for rank in range(world_size):
                assert all(torch.equal(a, b) for a, b in zip(synced[rank]["params"][step], plain[rank]["params"][step]))
                if step < EVERY - 1:
                    assert torch.equal(synced[rank]["momenta"][step], plain[rank]["momenta"][step])
    # at the first sync, rank j of every node holds the voters' mean of chunk j (bf16 on the wire)
    sync_step = EVERY - 1
    for local in range(ranks_per_node):
        ranks = [node * ranks_per_node + local for node in range(voters)]
        momenta = torch.stack([plain[r]["momenta"][sync_step] for r in ranks])
        scale = momenta.abs().max(0).values  # each bf16 term and partial sum rounds by 2^-9 of its size
        for r in ranks:
            got = synced[r]["momenta"][sync_step]
            assert torch.equal(got, synced[ranks[0]]["momenta"][sync_step])
            assert ((got - momenta.mean(0)).abs() <= 2 * voters * 2 ** -9 * scale).all()
        assert not torch.equal(plain[ranks[0]]["momenta"][sync_step], plain[ranks[1]]["momenta"][sync_step])
    # the run diverges from the plain one after the sync (the sync changed the momenta, hence the votes)
    assert any(not torch.equal(a, b) for a, b in zip(synced[0]["params"][-1], plain[0]["params"][-1]))
    # bytes: the vote's, plus one bf16 ring all-reduce of the voter's momentum per sync
    extra = (STEPS // EVERY) * ring_allreduce_bytes(2 * synced[0]["chunk"], voters)
    for rank in range(world_size):
        assert synced[rank]["bytes"]["inter_node_bytes_sent"] == plain[rank]["bytes"]["inter_node_bytes_sent"] + extra
        assert synced[rank]["bytes"]["bytes_sent"] == plain[rank]["bytes"]["bytes_sent"] + extra


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "10"])
def test_momentum_sync_every_must_be_a_whole_number_of_steps(every):
    with pytest.raises(ValueError, match="momentum_sync_every"):
        DistLion([torch.nn.Parameter(torch.zeros(SHAPES[0]))], momentum_sync_every=every)
