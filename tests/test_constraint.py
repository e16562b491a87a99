"""The constraint monitor: ||lambda x||_inf, the coordinates outside the box, and the two phases.

Known tensors give exact values; a tiny run that starts outside the box and is pushed
outward by every gradient shows phase 1 ("decaying", within the bound ``steps_to_box``
gives) and then phase 2 ("inside", for good); on gloo ranks the stats are the same on
every rank, and under FSDP2 equal to those of the full parameters.
"""

import math

import pytest
import torch

from distlion import DistLion
from distlion.constraint import local_measures, overall, steps_to_box, summarise, tolerance
from multiprocess import run_ranks
from simulation import _grads, _params

EPS32 = torch.finfo(torch.float32).eps


def test_tolerance_and_steps_to_box_follow_the_formulas():
    assert tolerance(0.1, 1.0) == 2 * EPS32 / 0.1 + EPS32
    assert tolerance(0.1, 1.0, torch.bfloat16) == 2 * EPS32 / 0.1 + 2.0 ** -7
    assert tolerance(0.0, 1.0) == EPS32  # nothing decays: only the dtype's rounding
    assert steps_to_box(3.0, 0.01, 0.1, 1.0) == 51  # 0.9**51 * 2 <= 0.01 < 0.9**50 * 2
    assert steps_to_box(1.005, 0.01, 0.1, 1.0) == 0
    assert steps_to_box(3.0, 0.01, 0.0, 1.0) is None


def test_local_measures_of_known_tensors():
    tensors = [torch.tensor([3.0, -1.0, 0.5, 0.25]), torch.tensor([[-2.5, 0.0], [1.9, 2.0]]), torch.zeros(0)]
    largest, counts = local_measures(tensors, (2.0, 0.9))
    assert largest.item() == 3.0 and counts.tolist() == [2, 5]  # 3 and -2.5 (2.0 is on the boundary); and 1, 1.9, 2
    largest, counts = local_measures([torch.zeros(0)], (1.0,))
    assert largest.item() == 0.0 and counts.tolist() == [0]


def test_summarise_names_the_phase():
    decaying = summarise(weight_decay=0.5, lr=0.1, numel=8, max_abs=3.0, outside=2, tol=1e-6, at_boundary=4)
    assert (decaying.scaled_max, decaying.fraction_outside, decaying.phase) == (1.5, 0.25, "decaying")
    assert decaying.fraction_at_boundary == 0.5
    assert decaying.steps_to_box == steps_to_box(1.5, 1e-6, 0.1, 0.5)
    inside = summarise(weight_decay=0.5, lr=0.1, numel=8, max_abs=2.0, outside=0, tol=1e-6)
    assert (inside.phase, inside.steps_to_box) == ("inside", 0)
    free = summarise(weight_decay=0.0, lr=0.1, numel=8, max_abs=9.0, outside=0, tol=1e-6)
    assert (free.phase, free.scaled_max, free.fraction_outside) == ("unbounded", None, None)
    broken = summarise(weight_decay=0.5, lr=0.1, numel=8, max_abs=math.nan, outside=0, tol=1e-6)
    assert broken.phase == "non-finite"
    whole = overall([decaying, inside, free])
    assert whole["phase"] == "decaying" and whole["scaled_max"] == 1.5
    assert whole["fraction_outside"] == 2 / 16 and whole["steps_to_box"] == decaying.steps_to_box
    assert whole["fraction_at_boundary"] == 4 / 16
    assert overall([inside, free])["phase"] == "inside" and overall([free])["phase"] == "unbounded"


def test_constraint_stats_of_known_parameters():
    boxed = torch.nn.Parameter(torch.tensor([3.0, -1.0, 1.99, 0.25]))
    half = torch.nn.Parameter(torch.tensor([[-4.0, 1.0]], dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.tensor([100.0]), requires_grad=False)  # DistLion leaves it still
    free = torch.nn.Parameter(torch.tensor([10.0]))
    opt = DistLion([{"params": [boxed, half, frozen], "weight_decay": 0.5}, {"params": [free]}], lr=0.1)
    stats = opt.constraint_stats()
    first, second = stats["groups"]
    assert (first["numel"], first["max_abs"], first["scaled_max"], first["outside"]) == (6, 4.0, 2.0, 2)
    assert first["at_boundary"] == 3  # |0.5 x| > 0.99: 3, -4 and 1.99 (0.995)
    assert first["tolerance"] == tolerance(0.1, 0.5, torch.bfloat16)  # the group's least precise dtype
    assert first["phase"] == "decaying" and first["previous_scaled_max"] is None
    assert (second["phase"], second["max_abs"], second["scaled_max"]) == ("unbounded", 10.0, None)
    assert stats["phase"] == "decaying" and stats["fraction_outside"] == 2 / 6
    assert opt.constraint_stats()["groups"][0]["previous_scaled_max"] == 2.0


@pytest.mark.parametrize("vote_ema_beta", [None, 0.9])
def test_two_phases_when_every_gradient_pushes_outward(vote_ema_beta):
    """lambda = 1, lr = 0.1: x starts at |lambda x| = 4 and every step's vote pushes it away from 0
    (the worst case for the decay). The excess shrinks every step, the box is reached no later than
    the first ``steps_to_box`` said, and it is never left again."""
    x = torch.nn.Parameter(torch.tensor([4.0, -4.0, 0.5, -2.0]))
    opt = DistLion([x], lr=0.1, weight_decay=1.0, vote_ema_beta=vote_ema_beta)
    stats = opt.constraint_stats()
    assert stats["phase"] == "decaying" and stats["scaled_max"] == 4.0 and stats["fraction_outside"] == 0.75
    bound = stats["steps_to_box"]
    phases = []
    for _ in range(bound + 30):
        x.grad = -x.detach().sign()  # loss -|x|: the vote moves every coordinate outward
        opt.step()
        stats = opt.constraint_stats()
        phases.append(stats["phase"])
        group = stats["groups"][0]
        assert group["scaled_max"] <= group["previous_scaled_max"]
    entered = phases.index("inside") + 1
    assert 1 < entered <= bound
    assert set(phases[:entered - 1]) == {"decaying"} and set(phases[entered - 1:]) == {"inside"}
    assert stats["scaled_max"] > 1 - 1e-3  # pinned at the boundary, where the exact arithmetic stops
    assert stats["fraction_outside"] == 0.0 and stats["fraction_at_boundary"] == 1.0  # all pushed to the boundary


def test_inside_the_box_from_the_start_stays_inside():
    x = torch.nn.Parameter(torch.tensor([0.5, -0.9, 0.0, 0.99]))
    opt = DistLion([x], lr=0.05, weight_decay=1.0)
    for _ in range(40):
        x.grad = -x.detach().sign() - 0.1  # outward (and the zero rule at 0)
        opt.step()
        assert opt.constraint_stats()["phase"] == "inside"


# ------------------------------------------------------------------------ several ranks

def _stats_on_ranks(rank, world_size, ranks_per_node):
    params = _params()
    opt = DistLion([{"params": params[:2], "weight_decay": 2.0}, {"params": params[2:], "weight_decay": 0.0}],
                   lr=0.05, ranks_per_node=ranks_per_node)
    history = [opt.constraint_stats()]
    for step in range(1, 9):
        for p, g in zip(params, _grads(rank, step, "random")):
            p.grad = g
        opt.step()
        history.append(opt.constraint_stats())
    flat = torch.cat([p.detach().reshape(-1) for p in params[:2]])
    return history, flat


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_stats_are_identical_on_every_rank(ranks_per_node):
    results = run_ranks(_stats_on_ranks, 2, ranks_per_node)
    (history, flat), (other, _) = results
    assert history == other  # every number of every call
    assert history[0]["phase"] == "decaying" and history[0]["groups"][1]["phase"] == "unbounded"
    last = history[-1]["groups"][0]
    assert last["max_abs"] == flat.abs().max().item()
    assert last["outside"] == int((flat.abs() > (1 + last["tolerance"]) / 2.0).sum())


def _fsdp_stats(rank, world_size, mesh_shape):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    shapes = [(5, 3), (1, 4), (33, 7)]  # uneven shards; a shard with no rows on rank 1
    for index, shape in enumerate(shapes):
        model.register_parameter(f"p{index}", torch.nn.Parameter(3 * torch.randn(shape, generator=gen)))
    fully_shard(model, mesh=mesh["shard"])
    params = list(model.parameters())
    opt = DistLion([{"params": params[:2], "weight_decay": 0.7}, {"params": params[2:], "weight_decay": 0.4}],
                   lr=0.05, device_mesh=mesh)
    results = []
    for step in range(4):
        if step:
            for p in params:
                local = p.to_local()
                p.grad = type(p).from_local(torch.randn(local.shape, generator=gen), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
            opt.step()
        stats = opt.constraint_stats()
        full = [[p.full_tensor() for p in group["params"]] for group in opt.param_groups]
        results.append((stats, full))
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_fsdp2_stats_equal_those_of_the_full_parameters():
    pytest.importorskip("torch.distributed.fsdp")
    per_rank = run_ranks(_fsdp_stats, 2, (1, 2), timeout=200)
    assert [stats for stats, _ in per_rank[0]] == [stats for stats, _ in per_rank[1]]
    for stats, full in per_rank[0]:
        for measured, tensors, wd in zip(stats["groups"], full, (0.7, 0.4)):
            flat = torch.cat([t.reshape(-1) for t in tensors])
            assert measured["numel"] == flat.numel()
            assert measured["max_abs"] == flat.abs().max().item()
            assert measured["scaled_max"] == flat.abs().max().item() * wd
            assert measured["outside"] == int((flat.abs() > (1 + measured["tolerance"]) / wd).sum())
        assert stats["groups"][0]["outside"] > 0  # 3 * randn starts outside the box of 1 / 0.7


# ------------------------------------------------------------------------ the trainer

@pytest.mark.scripts
@pytest.mark.timeout(180)
def test_trainer_logs_the_box_and_the_report_plots_it(tmp_path):
    """launch.train records constraint_stats at every validation point; launch.report draws a third panel."""
    import json
    import os
    import subprocess
    import sys

    from launch.recipe import SMOKE_ARGS
    from launch.report import _constraint_curves, write_report

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "boxed"
    result = subprocess.run([sys.executable, "-m", "launch.train", "--optimizer", "distlion", *SMOKE_ARGS,
                             "--weight_decay", "30", "--embedding_lr_scale", "1", "--no_progress", "--out", str(out)],
                            capture_output=True, text=True, timeout=170, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max|wd*x|" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    entries = [h["constraint"] for h in metrics["history"]]
    assert [h["step"] for h in metrics["history"]] == [0, 6, 12]
    assert entries[0]["phase"] == "decaying" and entries[0]["scaled_max"] > 1  # 30 * the init's largest weight
    assert [g["phase"] for g in entries[0]["groups"]][-1] == "unbounded"  # biases and gains: no decay
    for earlier, later in zip(entries, entries[1:]):  # outside the box the largest |x| shrinks every step
        assert earlier["phase"] != "decaying" or later["scaled_max"] < earlier["scaled_max"]
    curves = _constraint_curves(metrics)
    assert len(curves) == 1 and [s for s, _ in next(iter(curves.values()))] == [0, 6, 12]
    report = write_report({"distlion": metrics}, str(tmp_path / "report"))
    assert report["plotted"] in (True, False)  # False only without matplotlib
