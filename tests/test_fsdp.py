"""DistLion over FSDP2: ``fully_shard`` inside a node, the 1-bit vote across replicas.

A (M, G) mesh of real gloo processes is M nodes of G ranks (rank = m * G + g): FSDP's
reduce-scatter gives each rank its node's mean gradient on its shards, and the ranks of
the "replicate" dim vote. The full parameters must equal ``simulation.simulate(M * G, ...,
ranks_per_node=G)`` on every rank and step. The model's loss is sum_i (w_i * g_i).sum()
with the rank's own g_i, so grad w_i = g_i before FSDP's mean; the gradients are dyadic
with no exact zeros of c, since the zero rule's index is the coordinate's place in the
local bucket (not the simulation's).
"""

import io

import pytest
import torch
import torch.distributed as dist

from distlion import DistLion
from multiprocess import run_ranks
from rank_checks import assert_every_rank_skipped_step_2
from simulation import BETAS, LR, SHAPES, WD, _grads, _params, assert_equal_histories, simulate

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")

pytestmark = pytest.mark.multiprocess

STEPS = 4
STYLE = "nonzero"
VOTES = [("majority", "two_phase", None), ("average", "all_gather", 0.9)]


class _Weighted(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        return (self.weight * grad).sum()


class _Model(torch.nn.Module):
    """The simulation's parameters, in its order: the root holds the first, two blocks the others."""

    def __init__(self):
        super().__init__()
        first, *others = _params()
        self.weight = torch.nn.Parameter(first.detach())
        self.blocks = torch.nn.ModuleList(_Weighted(p.detach()) for p in others)

    def forward(self, grads: list[torch.Tensor]) -> torch.Tensor:
        loss = (self.weight * grads[0]).sum()
        for block, grad in zip(self.blocks, grads[1:]):
            loss = loss + block(grad)
        return loss


def _sharded_model(mesh, dtype=torch.float32, **fsdp_options) -> _Model:
    from torch.distributed.fsdp import fully_shard

    model = _Model().to(dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"], **fsdp_options)
    fully_shard(model, mesh=mesh["shard"], **fsdp_options)
    return model


def _train(rank, mesh, vote="majority", exchange="auto", vote_ema_beta=None, micro_batches=1, load_later=False,
           **fsdp_options):
    """Train STEPS steps; return the full parameters after each step, the model and the optimizer.

    ``load_later``: build DistLion on zeroed parameters, then load the initial values in place.
    """
    model = _sharded_model(mesh, **fsdp_options)
    if load_later:
        from torch.distributed.tensor import distribute_tensor

        values = {name: distribute_tensor(p.detach(), param.device_mesh, param.placements)
                  for p, (name, param) in zip(_params(), model.named_parameters())}
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
    opt = DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, vote=vote, exchange=exchange,
                   vote_ema_beta=vote_ema_beta, device_mesh=mesh)
    if load_later:
        model.load_state_dict(values)  # in place, into FSDP's shards: DistLion must pick the values up
    history = []
    for step in range(1, STEPS + 1):
        grads = _grads(rank, step, STYLE)
        # micro-batches of 1/4 and 3/4 of the gradient: dyadic, so their sum is exactly the gradient
        shares = [1.0] if micro_batches == 1 else [0.25, 0.75]
        for index, share in enumerate(shares):
            model.set_requires_gradient_sync(index == len(shares) - 1)
            model([g * share for g in grads]).backward()
        opt.step()
        opt.zero_grad()
        history.append([p.full_tensor().clone() for p in model.parameters()])
    return history, model, opt


def _nonfinite_on_one_rank(rank, mesh):
    """Rank 3 (node 1, shard 1) sends an inf at step 2 in a row of shard 0: only shard 0's ranks see it."""
    model = _sharded_model(mesh)
    opt = DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, device_mesh=mesh)
    snapshots = []
    for step in range(1, 5):
        grads = _grads(rank, step, STYLE)
        if step == 2 and rank == 3:
            grads[0][3, 3] = float("inf")
        model(grads).backward()
        opt.step()
        opt.zero_grad()
        momentum = torch.cat([s["exp_avg"].reshape(-1) for s in opt.state.values()])
        snapshots.append(([p.full_tensor().clone() for p in model.parameters()], momentum.clone()))
    return snapshots, opt.comm_stats.skipped_steps


def _save_and_resume(rank, mesh, k=2):
    """Train 2k steps; also save after k, resume into a fresh model and DistLion and train k more.

    Returns whether the resumed run equals the uninterrupted one, and the error of loading this
    rank's state into the rank that holds the other shards.
    """
    def run(model, opt, steps):
        for step in steps:
            model(_grads(rank, step, STYLE)).backward()
            opt.step()
            opt.zero_grad()

    def build():
        model = _sharded_model(mesh)
        return model, DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, vote_ema_beta=0.9,
                               device_mesh=mesh)

    model, opt = build()
    run(model, opt, range(1, k + 1))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    run(model, opt, range(k + 1, 2 * k + 1))
    resumed, opt2 = build()
    resumed.load_state_dict(weights)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    opt2.load_state_dict(saved)
    run(resumed, opt2, range(k + 1, 2 * k + 1))
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), resumed.parameters()))
    same &= all(torch.equal(opt.state[a][key], opt2.state[b][key])
                for a, b in zip(model.parameters(), resumed.parameters()) for key in opt.state[a])
    saved["distlion"]["shard_rank"] = 1 - saved["distlion"]["shard_rank"]  # the other shards' file
    return same, _error(lambda: opt2.load_state_dict(saved))


def _dcp_resume(rank, mesh, directory, k=2):
    """``_save_and_resume`` through DCP, with bf16 shards (fp32 masters) and the vote EMA: every state tensor.

    Also returns the full stacked momentum at the save (to check a resharded load against)
    and the error of loading into a mesh with four replicas.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from distlion.dcp import sharded_state

    def build(on_mesh):
        model = _sharded_model(on_mesh, dtype=torch.bfloat16)
        return model, DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, vote_ema_beta=0.9,
                               device_mesh=on_mesh)

    def run(model, opt, steps):
        for step in steps:
            model([g.to(torch.bfloat16) for g in _grads(rank, step, STYLE)]).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build(mesh)
    run(model, opt, range(1, k + 1))
    dcp.save({"model": model.state_dict(), "optimizer": sharded_state(opt)}, checkpoint_id=directory)
    saved = {index: {key: value.full_tensor() for key, value in tensors.items()}
             for index, tensors in sharded_state(opt).state_dict()["state_by_replica"].items()}
    run(model, opt, range(k + 1, 2 * k + 1))
    resumed, opt2 = build(mesh)
    opt2.param_groups[0]["lr"] = 1.0  # the checkpoint's hyperparameters win
    dcp.load({"model": resumed.state_dict(), "optimizer": sharded_state(opt2)}, checkpoint_id=directory)
    same_step = opt2._step == k and opt2.param_groups[0]["lr"] == LR
    run(resumed, opt2, range(k + 1, 2 * k + 1))
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), resumed.parameters()))
    same &= all(torch.equal(opt.state[a][key], opt2.state[b][key])
                for a, b in zip(model.parameters(), resumed.parameters()) for key in opt.state[a])
    four_replicas = init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard"))
    _, other = build(four_replicas)
    try:
        dcp.load({"optimizer": sharded_state(other)}, checkpoint_id=directory)
        mismatch = None
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        mismatch = str(error)
    return same and same_step, saved, mismatch


def _dcp_load_resharded(rank, world_size, mesh_shape, directory):
    """Load the (2, 2) run's DCP checkpoint on a (2, 1) mesh: each rank's rows of the saved state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from distlion.dcp import sharded_state

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    model = _sharded_model(mesh, dtype=torch.bfloat16)
    opt = DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, vote_ema_beta=0.9, device_mesh=mesh)
    dcp.load({"model": model.state_dict(), "optimizer": sharded_state(opt)}, checkpoint_id=directory)
    state = sharded_state(opt).state_dict()["state_by_replica"]
    return {index: {key: value.full_tensor() for key, value in tensors.items()} for index, tensors in state.items()}


def _dcp_load_other_replicas(rank, world_size, mesh_shape, directory, rule):
    """Load the (2, 2) run's DCP checkpoint on a mesh of another number of replicas, mapped by ``rule``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from distlion.dcp import sharded_state

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    model = _sharded_model(mesh, dtype=torch.bfloat16)
    opt = DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, vote_ema_beta=0.9, device_mesh=mesh,
                   on_topology_change=rule)
    dcp.load({"model": model.state_dict(), "optimizer": sharded_state(opt, checkpoint_id=directory)},
             checkpoint_id=directory)
    state = sharded_state(opt).state_dict()["state_by_replica"]
    loaded = {index: {key: value.full_tensor() for key, value in tensors.items()} for index, tensors in state.items()}
    for step in range(3):  # the replicas train on and stay identical
        model([g.to(torch.bfloat16) for g in _grads(rank, step, STYLE)]).backward()
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.full_tensor().float().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(every, flat)
    return loaded, opt._step, all(torch.equal(every[0], x) for x in every)


def _replicated(rank, mesh):
    """Replicate() DTensors (not sharded) over one node of two ranks: DistLion's own node sharding applies."""
    from torch.distributed.tensor import DTensor, Replicate

    params = [torch.nn.Parameter(DTensor.from_local(p.detach(), mesh["shard"], [Replicate()])) for p in _params()]
    opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, ranks_per_node=2)
    history = []
    for step in range(1, STEPS + 1):
        for p, g in zip(params, _grads(rank, step, STYLE)):
            p.grad = DTensor.from_local(g, mesh["shard"], [Replicate()], run_check=False)
        opt.step()
        history.append([p.to_local().clone() for p in params])
    return history


def _error(build) -> str | None:
    try:
        build()
    except ValueError as error:
        return str(error)
    return None


def _scenarios(rank, world_size, mesh_shape, bf16, directory=None):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    results = {}
    for combo in VOTES:
        history, model, opt = _train(rank, mesh, *combo)
        state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t is not None)
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        results[combo] = history, state_numel, local_numel, opt.ranks_per_node
    results["accumulated"] = _train(rank, mesh, micro_batches=2, load_later=True)[0]
    results["kept after forward"] = _train(rank, mesh, reshard_after_forward=False)[0]
    from distlion import local_shards

    default_piece, local_shards.PIECE = local_shards.PIECE, 64  # stage the shards 64 coordinates at a time
    history, _, opt = _train(rank, mesh, "average", "all_gather", 0.9)
    results["pieces"] = history, len(opt.layout.staging.pieces[0])
    local_shards.PIECE = default_piece
    if bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        history, model, opt = _train(rank, mesh, mp_policy=policy)
        results["bf16"] = history, [p.dtype for p in model.parameters()]
        history, model, opt = _train(rank, mesh, dtype=torch.bfloat16)  # bf16 shards, fp32 master weights
        results["bf16 shards"] = history, [p.dtype for p in model.parameters()], \
            sum(s["master"].numel() for s in opt.state.values())
    if mesh_shape == (2, 2):
        results["nonfinite"] = _nonfinite_on_one_rank(rank, mesh)
        results["resume"] = _save_and_resume(rank, mesh)
        results["dcp"] = _dcp_resume(rank, mesh, directory)
    if mesh_shape == (1, 2):
        results["replicated"] = _replicated(rank, mesh)
    from torch.distributed.fsdp import fully_shard

    model = _sharded_model(mesh)
    replicas = mesh.get_group("replicate")
    hybrid = fully_shard(_Model(), mesh=mesh)  # FSDP's own hybrid sharding over both dims
    results["errors"] = [
        _error(lambda: DistLion(model.parameters(), process_group=replicas, ranks_per_node=2)),
        _error(lambda: DistLion(model.parameters())),  # the world group: ranks of other shards would vote
        _error(lambda: DistLion(model.parameters(), process_group=replicas, device_mesh=mesh)),
        _error(lambda: DistLion(hybrid.parameters(), device_mesh=mesh)),
    ]
    return results


def _check(results, nodes, ranks_per_node):
    world_size = nodes * ranks_per_node
    numel = sum(p.numel() for p in _params())
    for combo in VOTES:
        vote, _, beta = combo
        expected = simulate(world_size, STEPS, STYLE, vote=vote, vote_ema_beta=beta, ranks_per_node=ranks_per_node)
        for per_rank in results:
            history, state_numel, local_numel, resolved = per_rank[combo]
            assert resolved == 1  # FSDP did the node's part
            assert_equal_histories(history, expected)
            # momentum (and the vote EMA) of this rank's shards only
            assert state_numel == local_numel * (1 if beta is None else 2)
        for node in range(nodes):
            shares = [results[node * ranks_per_node + g][combo][2] for g in range(ranks_per_node)]
            assert sum(shares) == numel and max(shares) <= -(-numel // ranks_per_node) + 2 * len(SHAPES)
    expected = simulate(world_size, STEPS, STYLE, ranks_per_node=ranks_per_node)
    for per_rank in results:  # two micro-batches, values loaded after DistLion was built; no reshard
        assert_equal_histories(per_rank["accumulated"], expected)
        assert_equal_histories(per_rank["kept after forward"], expected)
    expected = simulate(world_size, STEPS, STYLE, vote="average", vote_ema_beta=0.9, ranks_per_node=ranks_per_node)
    for per_rank in results:  # staged through pieces of 64 coordinates: the same steps
        history, pieces = per_rank["pieces"]
        assert pieces > 1
        assert_equal_histories(history, expected)


@pytest.fixture(scope="module")
def dcp_directory(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dcp"))


@pytest.fixture(scope="module")
def two_by_two(dcp_directory):
    return run_ranks(_scenarios, 4, (2, 2), True, dcp_directory, timeout=180)


@pytest.mark.timeout(200)
def test_two_nodes_of_two_match_the_node_simulation(two_by_two):
    _check(two_by_two, 2, 2)
    # the nodes' votes differ from a flat vote of the four ranks (the test can tell them apart)
    assert not torch.equal(simulate(4, STEPS, STYLE)[-1][0], two_by_two[0][VOTES[0]][0][-1][0])


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mesh_shape", [(1, 2), (2, 1)])
def test_one_node_and_one_rank_per_node(mesh_shape):
    results = run_ranks(_scenarios, 2, mesh_shape, False, timeout=120)
    _check(results, *mesh_shape)
    if mesh_shape == (1, 2):  # Replicate() DTensors: ranks_per_node=2 shards DistLion's state as for plain tensors
        expected = simulate(2, STEPS, STYLE, ranks_per_node=2)
        for per_rank in results:
            assert_equal_histories(per_rank["replicated"], expected)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case, dtype", [("bf16", torch.float32), ("bf16 shards", torch.bfloat16)])
def test_bf16_trains_and_replicas_stay_identical(two_by_two, case, dtype):
    """bf16 all-gathers of fp32 shards (MixedPrecisionPolicy), and bf16 shards with fp32 master weights."""
    history, dtypes = two_by_two[0][case][:2]
    assert dtypes == [dtype] * len(SHAPES)
    for step in range(STEPS):
        for per_rank in two_by_two[1:]:
            assert all(torch.equal(a, b) for a, b in zip(per_rank[case][0][step], history[step]))
    # trained: Lion moves each coordinate by lr a step (bf16 may round a back-and-forth to no change)
    moved = [(a != b.to(dtype)).float().mean().item() for a, b in zip(history[-1], _params())]
    assert min(moved) > 0.5, moved
    if case == "bf16 shards":
        numel = sum(p.numel() for p in _params())
        assert sum(per_rank[case][2] for per_rank in two_by_two[:2]) == numel  # masters of the local shards


@pytest.mark.timeout(200)
def test_a_node_setting_or_a_vote_group_across_shards_is_an_error(two_by_two):
    for per_rank in two_by_two:
        node_setting, across_shards, both, hybrid = per_rank["errors"]
        assert "ranks_per_node=2 with parameters sharded by FSDP" in node_setting
        assert "process_group holds ranks" in across_shards and "device_mesh=mesh" in across_shards
        assert "pass device_mesh or process_group" in both
        assert "sharded over a 2-D mesh" in hybrid


@pytest.mark.timeout(200)
def test_nonfinite_gradient_in_one_shard_makes_every_rank_skip(two_by_two):
    assert_every_rank_skipped_step_2([per_rank["nonfinite"] for per_rank in two_by_two])


@pytest.mark.timeout(200)
def test_exact_resume_from_per_rank_state_and_a_file_of_other_shards_is_an_error(two_by_two):
    for same, error in (per_rank["resume"] for per_rank in two_by_two):
        assert same
        assert "FSDP shards of shard rank" in error


@pytest.mark.timeout(200)
def test_dcp_resume_is_exact_and_another_number_of_replicas_is_an_error(two_by_two):
    for same, _, mismatch in (per_rank["dcp"] for per_rank in two_by_two):
        assert same
        assert mismatch is not None and "Size mismatch" in mismatch and "state_by_replica" in mismatch


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mesh_shape,rule", [((1, 2), "mean"), ((4, 1), "modulo"), ((3, 1), "mean_deviation")])
def test_dcp_state_loads_on_another_number_of_replicas_by_the_rule(two_by_two, dcp_directory, mesh_shape, rule):
    """Saved by 2 replicas x 2 shards; loaded by another number of replicas: each row by the rule."""
    from distlion.checkpoint.elastic import sources

    saved = two_by_two[0]["dcp"][1]
    replicas = mesh_shape[0]
    for loaded, step, identical in run_ranks(_dcp_load_other_replicas, replicas * mesh_shape[1], mesh_shape,
                                             dcp_directory, rule, timeout=150):
        assert step == 2 + 3 and identical
        for index, tensors in loaded.items():
            for key, rows in tensors.items():
                assert rows.shape[0] == replicas
                for replica in range(replicas):
                    chosen = sources(rule, replica, 2, replicas)
                    source = saved[index][key]
                    expected = source[chosen].float().mean(0) if key == "exp_avg" else source[chosen[0]]
                    torch.testing.assert_close(rows[replica].float(), expected.float(), rtol=0, atol=1e-7)


@pytest.mark.timeout(200)
def test_dcp_state_loads_on_another_shard_size(two_by_two, dcp_directory):
    """Saved by 2 x 2 ranks, loaded by 2 x 1: DCP re-splits each replica's rows of the state."""
    saved = two_by_two[0]["dcp"][1]
    loaded = run_ranks(_dcp_load_resharded, 2, (2, 1), dcp_directory, timeout=120)
    for per_rank in loaded:
        assert per_rank.keys() == saved.keys()
        for index, tensors in per_rank.items():
            assert all(torch.equal(tensors[key], saved[index][key]) for key in saved[index])


def _killed_before_a_step(rank, world_size):
    """2 x 2: rank 2 dies after its backward of step 3 (FSDP's reduce-scatter done), before DistLion's step."""
    import os
    import signal

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _sharded_model(mesh)
    opt = DistLion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, device_mesh=mesh, timeout=15)
    for step in range(1, 6):
        model(_grads(rank, step, STYLE)).backward()
        if step == 3 and rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.step()
        opt.zero_grad()


@pytest.mark.timeout(150)
def test_a_rank_killed_under_fsdp2_makes_the_survivors_fail_with_a_clear_message():
    """The vote and the skip agreement across the mesh give up after DistLion's timeout on every survivor."""
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        run_ranks(_killed_before_a_step, 4, timeout=120)
    assert time.monotonic() - start < 120
    message = str(error.value)
    assert "CollectiveError" in message and "another rank exited or crashed" in message
