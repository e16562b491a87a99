"""Worker routines and checks shared by the multi-process tests (run through ``multiprocess.run_ranks``)."""

from __future__ import annotations

import argparse
import io
import os
import shutil
from typing import Callable

import torch
import torch.distributed as dist

from distlion import DistLion
from simulation import BETAS, LR, WD, _grads, _params


def train(rank: int, steps: int, style: str, **kwargs) -> tuple[list[list[torch.Tensor]], DistLion]:
    """Train ``steps`` steps on this rank's gradients; return the parameters after each step and the optimizer."""
    params = _params()
    opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, **kwargs)
    history = []
    for step in range(1, steps + 1):
        for p, g in zip(params, _grads(rank, step, style)):
            p.grad = g
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def save_and_resume(rank: int, k: int, style: str, **kwargs) -> tuple[bool, bool, bytes]:
    """Train 2k steps; also save after k, resume into a fresh DistLion and train k more.

    Returns whether the resumed run's parameters and state equal the uninterrupted run's,
    and the saved bytes ({"params", "opt"}).
    """
    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, _grads(rank, step, style)):
                p.grad = g
            opt.step()

    params = _params()
    opt = DistLion(params, lr=LR, weight_decay=WD, **kwargs)
    run(params, opt, range(1, k + 1))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    run(params, opt, range(k + 1, 2 * k + 1))

    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = DistLion(resumed, lr=LR, weight_decay=WD, **kwargs)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, range(k + 1, 2 * k + 1))
    state_equal = all(torch.equal(opt.state[a][key], opt2.state[b][key])
                      for a, b in zip(params, resumed) for key in opt.state[a])
    params_equal = all(torch.equal(a, b) for a, b in zip(params, resumed))
    return params_equal, state_equal, buffer.getvalue()


def assert_every_rank_skipped_step_2(results: list) -> None:
    """``results``: per rank, (snapshots of (params, momentum) after steps 1-4, skipped steps)."""
    for snapshots, skipped in results:
        assert skipped == 1
        (p1, m1), (p2, m2) = snapshots[0], snapshots[1]
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))  # no decay, no step
        assert torch.equal(m1, m2)  # no momentum update
        assert not torch.equal(snapshots[2][0][0], p2[0])  # training went on
    for snapshots, _ in results[1:]:
        for (a, _), (b, _) in zip(snapshots, results[0][0]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def all_gather_bytes_per_step(numel: int, world_size: int) -> int:
    """The core's all_gather exchange: (N-1) * (padded/8 + 8 flag bytes), padded to 64*N."""
    multiple = 64 * world_size
    padded = -(-numel // multiple) * multiple
    return (world_size - 1) * (padded // 8 + 8)


def saved_state_files(directory: str, world_size: int) -> list[str]:
    """The DistLion files ``directory`` holds, checked to be exactly one sealed save of ``world_size`` ranks:
    the manifest's names, by rank (each named for its rank), after the manifest."""
    from distlion.checkpoint.files import MANIFEST_FILE, Manifest

    manifest = Manifest.read(directory)
    names = [entry.name for entry in manifest.files]
    assert manifest.world_size == world_size and all(
        name.startswith(f"distlion_optimizer0_rank{rank}_of_{world_size}.s") for rank, name in enumerate(names))
    held = sorted(name for name in os.listdir(directory) if name.startswith("distlion_optimizer"))
    assert held == sorted([MANIFEST_FILE.format(index=0), *names]), held
    return names


def make_bad_checkpoints(state_dir: str, world3: str, unsealed: str) -> None:
    """From the DistLion files in ``state_dir``: ``world3``, the same save re-split for 3 ranks (a resume on
    another topology), and ``unsealed``, its files without the manifest (a save that did not finish)."""
    from distlion.checkpoint.__main__ import reshard

    reshard(state_dir, world3, 3, 1, "mean", 0)
    os.makedirs(unsealed, exist_ok=True)
    for name in os.listdir(state_dir):
        if name.startswith("distlion_optimizer") and not name.endswith("manifest.json"):
            shutil.copy(os.path.join(state_dir, name), os.path.join(unsealed, name))


def assert_resume_errors(resumed: list[dict], world_size: int, hint: str) -> None:
    """Each rank of a resume launch failed on a checkpoint without DistLion's files ("plain") and on one whose
    save did not finish ("unsealed"), with errors naming what is missing and the fix, and resumed from one of
    world size 3 ("world3") without an error."""
    for result in resumed:
        plain, unsealed = result["errors"]["plain"], result["errors"]["unsealed"]
        assert plain.startswith("ValueError: No DistLion optimizer state for rank")
        assert "expected distlion_optimizer0_manifest.json" in plain and hint in plain
        assert "but no manifest distlion_optimizer0_manifest.json: the save that wrote them did not finish" in \
            unsealed
        assert "world3" not in result["errors"], result["errors"]["world3"]


def run_job_phase(phases: dict[str, Callable[[argparse.Namespace], dict]]) -> None:
    """The launched job scripts' main: run ``--phase`` (with ``--out``, ``--ckpt``, ``--bad-ckpt``) and save
    this rank's result as ``<out>/<phase>_rank<r>.pt``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=list(phases), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt")
    parser.add_argument("--bad-ckpt", action="append", default=[])
    options = parser.parse_args()
    result = phases[options.phase](options)
    result["world_size"] = dist.get_world_size()
    torch.save(result, os.path.join(options.out, f"{options.phase}_rank{dist.get_rank()}.pt"))
