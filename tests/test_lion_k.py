"""Lion-K with a ternary gradient of K (k="dead_zone", k="top") against a reference written from the formulas.

The reference (``simulate_ternary``) knows nothing of bits: per node it computes c on the
padded bucket (chunk j of it for a node's rank j), the moving mask of the rule, t = sign(c)
where it moves, and applies D = sign(sum t) (majority) or mean(t) (average) with decoupled
weight decay. DistLion must match it bit for bit on every rank and step; k="sign" must be
today's DistLion, bit for bit.
"""

import math

import pytest
import torch

from distlion import DistLion
from distlion.kernels import BACKENDS, backend, ternary
from distlion.vote import VoteRule
from multiprocess import run_ranks
from simulation import BETAS, LR, WD, _grads, _params, simulate

RULES = {"dead_zone": dict(k_threshold=0.8), "top": dict(k_fraction=0.25)}


def _backends():
    names = []
    for name in BACKENDS:
        try:
            backend(name)
        except ImportError:
            continue
        if name == "cpu_native" and not backend(name).available():
            continue
        if name == "triton_kernels":
            continue  # CUDA (or TRITON_INTERPRET=1): tests/kernels
        names.append(name)
    return names


# ------------------------------------------------------------------------------ reference

def _moving(magnitude, rule, options):
    if rule == "dead_zone":
        return magnitude > magnitude.mean() * options["k_threshold"]
    count = max(1, math.ceil(options["k_fraction"] * magnitude.numel()))
    kth = magnitude.sort(descending=True).values[count - 1]
    return magnitude >= kth


def simulate_ternary(world_size, steps, style, rule, vote, padded, offsets, ranks_per_node=1, options=None):
    """DistLion-K written from the formulas: one padded bucket of ``padded`` coordinates, parameter i at
    ``offsets[i]``; nodes of ``ranks_per_node`` ranks vote, rank j of a node packs chunk j."""
    options = options or RULES[rule]
    nodes = world_size // ranks_per_node
    x = torch.zeros(padded)
    for p, at in zip(_params(), offsets):
        x[at:at + p.numel()] = p.detach().reshape(-1)
    momentum = [torch.zeros(padded) for _ in range(nodes)]
    history = []
    for step in range(1, steps + 1):
        t = []
        for node in range(nodes):
            grad = torch.zeros(padded)
            for rank in range(node * ranks_per_node, (node + 1) * ranks_per_node):
                for g, at in zip(_grads(rank, step, style), offsets):
                    grad[at:at + g.numel()] += g.reshape(-1)
            grad = grad / ranks_per_node if ranks_per_node > 1 else grad
            c = (momentum[node] * BETAS[0]).add(grad, alpha=1 - BETAS[0])
            moves = torch.cat([_moving(chunk.abs(), rule, options) for chunk in c.chunk(ranks_per_node)])
            t.append(torch.where(moves, c.sign(), torch.zeros_like(c)))
            momentum[node] = (momentum[node] * BETAS[1]).add(grad, alpha=1 - BETAS[1])
        total = torch.stack(t).sum(0)
        direction = total.sign() if vote == "majority" else total / torch.tensor(float(nodes))
        x = (x * (1.0 - LR * WD)).add(direction, alpha=-LR)
        history.append(x.clone())
    return history


# ----------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("rule", sorted(RULES))
def test_pack_interleaves_plus_and_minus_planes(rule):
    gen = torch.Generator().manual_seed(1)
    grad, momentum = torch.randn(256, generator=gen), torch.randn(256, generator=gen)
    grad[:8] = 0
    momentum[:8] = 0  # c == 0: never moves
    out = torch.empty(64, dtype=torch.uint8)
    flag = ternary.pack_ternary(grad, momentum, out, beta1=0.9, rule=rule, **{
        "threshold": RULES["dead_zone"]["k_threshold"], "fraction": RULES["top"]["k_fraction"]})
    assert not flag
    c = (momentum * 0.9).add(grad, alpha=0.1)
    moves = _moving(c.abs(), rule, RULES[rule])
    bits = ((out.view(-1, 2).unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool()  # [32, 2, 8]
    assert torch.equal(bits[:, 0].reshape(-1), (c > 0) & moves)
    assert torch.equal(bits[:, 1].reshape(-1), (c < 0) & moves)
    assert not bits[:1].any()
    grad[9] = math.nan
    assert ternary.pack_ternary(grad, momentum, out, beta1=0.9, rule=rule, threshold=1.0, fraction=0.1)


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("voters", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("vote", ["majority", "average"])
def test_vote_counts_the_ternary_sum(name, voters, vote):
    """Random plus/minus planes (never both set): the unfolded count is r + 1 or M + #plus - #minus."""
    gen = torch.Generator().manual_seed(voters)
    t = torch.randint(-1, 2, (voters, 512), generator=gen)
    packed = torch.stack([torch.stack([ternary.pack_bools(row > 0), ternary.pack_bools(row < 0)], -1).reshape(-1)
                          for row in t])
    rule = VoteRule(vote, voters, k="top")
    out = torch.empty(rule.planes, packed.shape[1], dtype=torch.uint8)
    ternary.vote(backend(name), packed, out, average=vote == "average")
    planes = ternary.unfold(out)
    count = sum((((planes[i].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).long() << i)
                for i in range(planes.shape[0]))
    total = t.sum(0)
    assert torch.equal(count, total.sign() + 1 if vote == "majority" else total + voters)


def test_options_are_checked():
    p = [torch.nn.Parameter(torch.zeros(4))]
    for kwargs, message in [(dict(k="topk"), "Invalid k: 'topk'"), (dict(k="top", k_fraction=0.0), "k_fraction"),
                            (dict(k="dead_zone", k_threshold=-1.0), "k_threshold"),
                            (dict(k="dead_zone", k_threshold=math.inf), "k_threshold")]:
        with pytest.raises(ValueError, match=message):
            DistLion(p, **kwargs)


# --------------------------------------------------------------------------- DistLion-K

def _run(rank, world_size, steps, style, combos, ranks_per_node=1):
    results = {}
    for rule, vote, exchange in combos:
        params = _params()
        opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, vote=vote, exchange=exchange, k=rule,
                       ranks_per_node=ranks_per_node, **RULES.get(rule, {}))
        bucket = opt.layout.buckets[0]
        history = []
        for step in range(1, steps + 1):
            for p, g in zip(params, _grads(rank, step, style)):
                p.grad = g
            opt.step()
            flat = torch.zeros(bucket.padded_numel)
            for slot in bucket.slots:
                flat[slot.offset:slot.offset + slot.numel] = params[slot.param_index].detach().reshape(-1)
            history.append(flat)
        results[rule, vote, exchange] = (history, opt.comm_stats.as_dict(), bucket.padded_numel,
                                         [slot.offset for slot in bucket.slots])
    return results


def _check(results, world_size, steps, style, ranks_per_node=1):
    for combo, (_, _, padded, offsets) in results[0].items():
        rule, vote, _ = combo
        expected = simulate_ternary(world_size, steps, style, rule, vote, padded, offsets, ranks_per_node)
        everything = simulate_ternary(world_size, steps, style, rule, vote, padded, offsets, ranks_per_node,
                                      options={"k_threshold": 0.0, "k_fraction": 1.0})
        assert not torch.equal(expected[-1], everything[-1])  # the rule left coordinates still
        for per_rank in results:
            for got, want in zip(per_rank[combo][0], expected):
                assert torch.equal(got, want), (combo, (got - want).abs().max())


@pytest.mark.parametrize("rule", sorted(RULES))
def test_one_rank_matches_the_reference(rule):
    combos = [(rule, vote, "auto") for vote in ("majority", "average")]
    _check([_run(0, 1, 6, "random", combos)], 1, 6, "random")


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_the_reference_and_stay_identical(world_size):
    combos = [(rule, vote, exchange) for rule in sorted(RULES) for vote in ("majority", "average")
              for exchange in ("two_phase", "all_gather")]
    results = run_ranks(_run, world_size, 4, "random", combos, timeout=280)
    _check(results, world_size, 4, "random")
    for rule, vote, exchange in combos:  # 2 bits per coordinate on the way up, the voted planes back
        stats = results[0][rule, vote, exchange][1]
        nbytes = results[0][rule, vote, exchange][2] // 8
        planes = VoteRule(vote, world_size, k=rule).planes
        if exchange == "two_phase":
            chunk = 2 * nbytes // world_size
            per_step = (world_size - 1) * (chunk + 8) + (world_size - 1) * planes * chunk
        else:
            per_step = (world_size - 1) * (2 * nbytes + 8)
        assert stats["bytes_sent"] == 4 * per_step


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_a_node_of_two_ranks_matches_the_reference():
    """ranks_per_node=2: the node's mean gradient, each rank thresholds and packs its chunk."""
    combos = [(rule, "majority", "auto") for rule in sorted(RULES)]
    results = run_ranks(_run, 2, 4, "dyadic", combos, 2, timeout=180)
    _check(results, 2, 4, "dyadic", ranks_per_node=2)


def test_sign_is_todays_distlion_bit_for_bit():
    for vote in ("majority", "average"):
        expected = simulate(1, 5, "ties", vote=vote)
        params = _params()
        opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, vote=vote, k="sign")
        assert opt.vote_rule.planes == 1 and opt.layout.states[0].bits.numel() == opt.layout.buckets[0].padded_numel // 8
        for step in range(1, 6):
            for p, g in zip(params, _grads(0, step, "ties")):
                p.grad = g
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(params, expected[step - 1]))


@pytest.mark.multiprocess
def test_fsdp2_parameters_are_refused_with_a_ternary_rule():
    pytest.importorskip("torch.distributed.tensor")
    run_ranks(_fsdp_refused, 2, timeout=120)


def _fsdp_refused(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    model = torch.nn.Linear(4, 4)
    fully_shard(model, mesh=mesh["shard"])
    with pytest.raises(ValueError, match="k='top' with parameters sharded by FSDP2"):
        DistLion(model.parameters(), device_mesh=mesh, k="top")


def test_trainer_takes_k_for_lion_only(capsys):
    from launch.train import parse_args

    assert parse_args(["--optimizer", "distlion", "--k", "dead_zone"]).k == "dead_zone"
    with pytest.raises(SystemExit) as error:
        parse_args(["--optimizer", "adamw", "--k", "top"])
    assert error.value.code == 2 and "--k top: only distlion and lion take it" in capsys.readouterr().err
