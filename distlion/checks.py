"""Checks that turn a silent failure into an error naming the value: arguments, parameters, and
agreement between ranks (layout, ranks_per_node, settings) before any other collective."""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.agreement import by_value
from distlion.comm.flat import flag_device, wait_for
from distlion.buckets import BucketLayout


def is_real_number(value: Any) -> bool:
    """A Python or 0-dim tensor number that is not a bool (True is an int to Python)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_hyperparameters(lr: float, betas: tuple[float, float], weight_decay: float,
                           vote_ema_beta: float | None) -> None:
    if not (is_real_number(lr) and 0.0 <= float(lr) < math.inf):
        raise ValueError(f"Invalid learning rate: {lr!r}; use a finite non-negative number, e.g. 1e-4")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; use a pair (beta1, beta2), e.g. (0.9, 0.99)")
    for i, beta in enumerate(betas):
        if not (is_real_number(beta) and 0.0 <= float(beta) < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r}; use a value in [0, 1)")
    if not (is_real_number(weight_decay) and 0.0 <= float(weight_decay) < math.inf):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r}; use a finite non-negative number, "
                         f"e.g. 0.1")
    if vote_ema_beta is not None and not (is_real_number(vote_ema_beta) and 0.0 <= vote_ema_beta < 1.0):
        raise ValueError(f"Invalid vote_ema_beta: {vote_ema_beta!r}; use a value in [0, 1), e.g. 0.9, or None "
                         f"for Lion's unscaled step")


def check_parameters(params: list[Tensor]) -> None:
    """Raise for a parameter listed twice (its bucket slots would update it twice) or one on the meta device."""
    seen: dict[int, int] = {}
    for position, param in enumerate(params):
        if id(param) in seen:
            raise ValueError(f"The parameter of shape {tuple(param.shape)} is listed twice, at positions "
                             f"{seen[id(param)]} and {position} of the optimizer's parameters: pass each parameter "
                             f"once (e.g. list(dict.fromkeys(params)) for tied weights)")
        seen[id(param)] = position
        if param.device.type == "meta":
            raise ValueError(f"The parameter of shape {tuple(param.shape)} at position {position} is on the meta "
                             f"device: materialise the model first (e.g. model.to_empty(device=...) and initialise "
                             f"it), then build DistLion")


def _setting_digest(value: Any) -> int:
    """A digest of ``value`` by value: tensor(0.01) and tensor(0.01003) differ, though both print 0.0100."""
    return int.from_bytes(hashlib.sha256(repr(by_value(value)).encode()).digest()[:8], "little", signed=True)


def check_layout_agrees(layout: BucketLayout, group: Any, ranks_per_node: int, settings: dict[str, Any],
                         timeout: timedelta | None) -> None:
    """Raise on every rank of ``group`` if any rank laid out other parameters or nodes, or has other
    ``settings`` (instead of hanging later, or drifting apart)."""
    problem = disagreement(layout, group, ranks_per_node, settings, timeout)
    if problem is not None:
        raise RuntimeError(problem)


def disagreement(layout: BucketLayout, group: Any, ranks_per_node: int, settings: dict[str, Any],
                 timeout: timedelta | None) -> str | None:
    """What differs between the ranks of ``group`` (every rank gets the same answer): the layout,
    ``ranks_per_node``, the settings' names or a named setting's value, with the ranks; None when they agree.

    First one all_gather of a fixed-size header (the layout and the settings' names); only when every
    rank's header agrees, so that every rank has as many settings, a second one of the settings' values.
    """
    if group is None or dist.get_world_size(group) == 1:
        return None
    names = _setting_digest(tuple(settings))
    header = [ranks_per_node, layout.num_params, layout.numel, len(layout.buckets),
              *bytes.fromhex(layout.signature()), len(settings), names]
    everyone = _gather(header, group, timeout)
    here = dist.get_rank(group)
    if any(not torch.equal(other, everyone[here]) for other in everyone):
        lines = [f"rank {r}: ranks_per_node {int(t[0])}, {int(t[1])} parameters, {int(t[2]):,} elements, "
                 f"{int(t[3])} bucket(s), layout {bytes((t[4:-2] & 0xFF).tolist()).hex()[:12]}, "
                 f"{int(t[-2])} settings" for r, t in enumerate(everyone)]
        return ("DistLion: the parameter layout or ranks_per_node differs between ranks (this is rank "
                f"{here} of this group):\n  " + "\n  ".join(lines) + "\nBuild the same model on every "
                "rank, pass the same parameters, in the same order and param groups, and the same "
                "ranks_per_node to DistLion; change them (add_param_group, requires_grad_, .to(dtype)) on "
                "every rank before the same step.")
    values = _gather([_setting_digest(value) for value in settings.values()], group, timeout)
    differing = []
    for position, name in enumerate(settings):
        ranks = [r for r, t in enumerate(values) if t[position] != values[0][position]]
        if ranks:
            differing.append(f"{name} (here {settings[name]!r}; ranks {ranks} differ from rank 0)")
    if not differing:
        return None
    return (f"DistLion: settings differ between ranks (this is rank {here} of this group): "
            + "; ".join(differing) + ". Every rank applies the same vote, so every rank needs the same "
            "settings: build DistLion with the same arguments on every rank, and change lr, betas or "
            "weight_decay (an LR scheduler, ReduceLROnPlateau fed a loss) alike on every rank.")


def _gather(values: list[int], group: Any, timeout: timedelta | None) -> list[Tensor]:
    """Every rank's ``values`` (int64; the same length on every rank), in group rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=flag_device(group))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    wait_for(dist.all_gather(everyone, mine, group=group, async_op=True), "the check that every rank built the "
             "same DistLion", timeout)
    return everyone
