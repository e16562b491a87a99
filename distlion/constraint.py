"""The box that decoupled weight decay keeps Lion in, measured: ||lambda * x||_inf and its two phases.

Lion with decoupled weight decay lambda solves ``min f(x) s.t. ||lambda * x||_inf <= 1``
(Chen, Liu et al., "Lion secretly solves constrained optimization: as Lyapunov
predicts"). DistLion's step is ``x <- x*(1 - lr*lambda) - lr*D`` with |D| <= 1 for every
vote (majority, average, the scaled step), so for every coordinate:

    outside the box (lambda*|x| > 1):  lambda*|x_new| - 1 <= (1 - lr*lambda) * (lambda*|x| - 1)
    inside it       (lambda*|x| <= 1): lambda*|x_new| <= 1

Phase 1 ("decaying"): some coordinate is outside, and its excess shrinks at least
geometrically, by (1 - lr*lambda) per step, whatever the gradients. Phase 2 ("inside"):
every coordinate is in the box, which the iterate never leaves; the optimizer minimises f
inside it. A param group without weight decay has no box ("unbounded"). A coordinate
the gradients keep pushing outward approaches the boundary from outside (the bound's
worst case): it is in once its excess is within the rounding ``tolerance`` below, after at
most ``steps_to_box`` steps at the current lr. ``fraction_outside`` says how many are
left; ``fraction_at_boundary``, in phase 2, how many the box holds back.

fp32 arithmetic realises the box only up to rounding: the decay factor fl(1 - lr*lambda)
and each step's rounding move the boundary by up to about 2*eps32 / (lr*lambda), relative
(measured: lambda*|x| settles at 1.0048 for lr*lambda = 1e-5), and a bf16/fp16 parameter
adds its own rounding. A coordinate counts as outside only beyond that ``tolerance``, so
one pinned at the boundary reads "inside", as the exact arithmetic has it.

The math is on plain tensors (``tolerance``, ``steps_to_box``, ``local_measures``,
``summarise``, ``overall``); ``measure`` adds the collectives that combine FSDP2 shards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.comm.flat import flag_device, wait_for
from distlion.local_shards import is_sharded, local_tensor

PHASES = ("decaying", "inside", "unbounded", "non-finite")
AT_BOUNDARY = 0.99  # lambda*|x| above this: at the box's boundary (``fraction_at_boundary``)
_EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------- the math

def tolerance(lr: float, weight_decay: float, dtype: torch.dtype = torch.float32) -> float:
    """Relative slack of the box as the step's arithmetic realises it: a coordinate is outside when
    ``lambda*|x| > 1 + tolerance``.

    2*eps32 / (lr*lambda) covers the rounding of the decay factor and of the step in fp32
    (no term when lr*lambda is 0: nothing decays then), plus eps of ``dtype`` for a
    bf16/fp16 parameter rounded from its fp32 master (eps32 for fp32).

    Example: ``tolerance(0.1, 1.0)`` is 2*eps32/0.1 + eps32, about 2.5e-6.
    """
    rate = lr * weight_decay
    return (2.0 * _EPS32 / rate if rate > 0 else 0.0) + torch.finfo(dtype).eps


def steps_to_box(scaled_max: float, tol: float, lr: float, weight_decay: float) -> int | None:
    """Upper bound on the steps at this lr until every coordinate is in the box (excess <= ``tol``).

    The excess ``scaled_max - 1`` shrinks by at least (1 - lr*lambda) per step, so it is
    within ``tol`` after ceil(log(tol / excess) / log(1 - lr*lambda)) steps; 0 when it is
    already; None when lr*lambda is not in (0, 1) (no contraction to bound it with).

    Example: ``steps_to_box(3.0, 0.01, 0.1, 1.0)`` is 51 (0.9**51 * 2 <= 0.01 < 0.9**50 * 2).
    """
    excess = scaled_max - 1.0
    if excess <= tol:
        return 0
    rate = lr * weight_decay
    if not 0.0 < rate < 1.0:
        return None
    return max(1, math.ceil(math.log(tol / excess) / math.log1p(-rate)))


def local_measures(tensors: list[Tensor], bounds: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Return max |x| over ``tensors`` (0-dim fp32) and, per bound of ``bounds``, the number of
    coordinates with |x| > bound (int64 [len(bounds)]).

    On the first tensor's device (CPU zeros when there are no coordinates); no host sync:
    one ``_foreach_norm`` for the maxima, one count per tensor and bound.
    """
    tensors = [t.detach() for t in tensors if t.numel() > 0]  # the inf norm of an empty tensor is undefined
    if not tensors:
        return torch.zeros((), dtype=torch.float32), torch.zeros(len(bounds), dtype=torch.int64)
    device = tensors[0].device
    maxima = torch._foreach_norm(tensors, ord=math.inf)
    largest = torch.stack([m.to(device=device, dtype=torch.float32) for m in maxima]).max()
    counts = torch.stack([torch.stack([torch.count_nonzero(magnitude > bound) for bound in bounds]).to(device)
                          for magnitude in (t.abs() for t in tensors)])
    return largest, counts.sum(0)


@dataclass(frozen=True)
class GroupConstraint:
    """The box of one param group, measured.

    Attributes:
        weight_decay: the group's lambda; the box is ||lambda * x||_inf <= 1.
        lr: the group's lr when measured (the contraction per step is 1 - lr*lambda).
        numel: coordinates measured (a sharded parameter counts its full size).
        max_abs: ||x||_inf.
        scaled_max: ||lambda * x||_inf; None without weight decay (no box).
        outside: coordinates with lambda*|x| > 1 + tolerance (0 without box).
        at_boundary: coordinates with lambda*|x| > ``AT_BOUNDARY`` (0.99), outside included: in
            phase 2, those the box holds back (where the constraint is active); 0 without box.
        fraction_outside, fraction_at_boundary: ``outside / numel``, ``at_boundary / numel``;
            None without box.
        tolerance: the box's relative slack (``tolerance()``); None without box.
        phase: "decaying" (some coordinate outside: phase 1), "inside" (phase 2), "unbounded"
            (lambda = 0), or "non-finite" (a parameter holds inf or nan).
        steps_to_box: at most this many more steps at this lr end phase 1 (``steps_to_box()``; 0
            inside; None without box, or when lr*lambda gives no bound).
        previous_scaled_max: ``scaled_max`` at the previous measurement (None at the first). It
            grows only if something else changed the parameters, or the box is not yet reached
            and lr*lambda was 0.
    """

    weight_decay: float
    lr: float
    numel: int
    max_abs: float
    scaled_max: float | None
    outside: int
    at_boundary: int
    fraction_outside: float | None
    fraction_at_boundary: float | None
    tolerance: float | None
    phase: str
    steps_to_box: int | None
    previous_scaled_max: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def summarise(*, weight_decay: float, lr: float, numel: int, max_abs: float, outside: int, tol: float,
              at_boundary: int = 0, previous_scaled_max: float | None = None) -> GroupConstraint:
    """One group's ``GroupConstraint`` from its measures: ``max_abs`` = ||x||_inf, ``outside``, the
    coordinates beyond the box with its relative slack ``tol``, and ``at_boundary``, those with
    lambda*|x| > ``AT_BOUNDARY``."""
    if weight_decay == 0:
        phase = "non-finite" if not math.isfinite(max_abs) else "unbounded"
        return GroupConstraint(weight_decay, lr, numel, max_abs, None, 0, 0, None, None, None, phase, None,
                               previous_scaled_max)
    scaled = max_abs * weight_decay
    if not math.isfinite(max_abs):
        phase, bound = "non-finite", None
    elif outside > 0:
        phase, bound = "decaying", steps_to_box(scaled, tol, lr, weight_decay)
    else:
        phase, bound = "inside", 0
    return GroupConstraint(weight_decay, lr, numel, max_abs, scaled, outside, at_boundary,
                           outside / numel if numel else 0.0, at_boundary / numel if numel else 0.0, tol, phase,
                           bound, previous_scaled_max)


def overall(groups: list[GroupConstraint]) -> dict:
    """The model's view of ``groups``, a dict for a training log.

    ``phase``: "non-finite" if any group is, else "decaying" if any group is, else
    "inside" if any group has a box, else "unbounded". ``scaled_max``: the largest
    ||lambda x||_inf; ``fraction_outside``, ``fraction_at_boundary``: of the boxed coordinates; ``steps_to_box``: the
    largest bound (None if a decaying group has none); ``groups``: each ``as_dict()``.
    """
    boxed = [g for g in groups if g.scaled_max is not None]
    phases = {g.phase for g in groups}
    numel = sum(g.numel for g in boxed)
    bounds = [g.steps_to_box for g in boxed]
    return {
        "phase": next((p for p in ("non-finite", "decaying", "inside") if p in phases), "unbounded"),
        "scaled_max": max((g.scaled_max for g in boxed), default=None),
        "fraction_outside": sum(g.outside for g in boxed) / numel if numel else None,
        "fraction_at_boundary": sum(g.at_boundary for g in boxed) / numel if numel else None,
        "steps_to_box": None if not boxed or None in bounds else max(bounds),
        "groups": [g.as_dict() for g in groups],
    }


# ------------------------------------------------------------------- measuring a model

def _place(param: Tensor) -> tuple | None:
    """Where ``param``'s coordinates are spread: its mesh's ranks for a DTensor sharded over more than
    one rank, else None (this rank holds all of it)."""
    if is_sharded(param) and param.device_mesh.size() > 1:
        return tuple(param.device_mesh.mesh.flatten().tolist())
    return None


def measure(param_groups: list[dict], previous: list[float | None] | None = None,
            timeout: timedelta | None = None) -> list[GroupConstraint]:
    """Measure the box of each group of ``param_groups`` (their ``params``, ``lr`` and ``weight_decay``).

    Only parameters with ``requires_grad`` count (the optimizer leaves the others still).
    A DTensor parameter sharded by FSDP2 is measured on this rank's shard, and the max and
    the count are reduced over its mesh (MAX, SUM; one pair of collectives per mesh for all
    groups): every rank of the mesh must call this, and gets the same result. Replicated
    parameters need no collective. One host sync in all (``tolist``). ``previous``: each
    group's ``scaled_max`` from the last measurement.
    """
    tols, bounds, numels = [], [], []
    per_place: dict[tuple | None, list[list[Tensor]]] = {}
    groups_of_mesh: dict[tuple, Any] = {}
    for index, group in enumerate(param_groups):
        params = [p for p in group["params"] if p.requires_grad]
        dtypes = {p.dtype for p in params} or {torch.float32}
        tol = max(tolerance(group["lr"], group["weight_decay"], dtype) for dtype in dtypes)
        tols.append(tol)
        decay = group["weight_decay"]
        bounds.append(((1.0 + tol) / decay, AT_BOUNDARY / decay) if decay else (math.inf, math.inf))
        numels.append(sum(p.numel() for p in params))
        for param in params:
            place = _place(param)
            per_place.setdefault(place, [[] for _ in param_groups])[index].append(local_tensor(param))
            if place is not None:
                groups_of_mesh.setdefault(place, param.device_mesh.get_group())
    maxima, counts = [], []  # per place: [groups] tensors, gathered on one device for a single host sync
    home = next((t.device for tensors in per_place.values() for ts in tensors for t in ts), torch.device("cpu"))
    for place, tensors in per_place.items():
        measured = [local_measures(ts, bound) for ts, bound in zip(tensors, bounds)]
        device = home if place is None else flag_device(groups_of_mesh[place])
        largest = torch.stack([m.to(device) for m, _ in measured])
        count = torch.stack([c.to(device) for _, c in measured])
        if place is not None:
            group = groups_of_mesh[place]
            wait_for(dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group, async_op=True),
                     "the max of |x| over the FSDP shards (constraint_stats)", timeout)
            wait_for(dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group, async_op=True),
                     "the count of coordinates outside the box over the FSDP shards (constraint_stats)", timeout)
        maxima.append(largest.to(home))
        counts.append(count.to(home))
    n = len(param_groups)
    if maxima:  # [groups], [groups, 2]: one host sync
        measured = torch.cat([torch.stack(maxima).amax(0).double().unsqueeze(1), torch.stack(counts).sum(0).double()],
                             dim=1).tolist()
    else:
        measured = [[0.0, 0, 0]] * n
    if previous is None or len(previous) != n:  # first call, or a param group was added since
        previous = [None] * n
    return [summarise(weight_decay=group["weight_decay"], lr=group["lr"], numel=numel, max_abs=m, outside=int(out),
                      tol=tol, at_boundary=int(near), previous_scaled_max=before)
            for group, numel, (m, out, near), tol, before in zip(param_groups, numels, measured, tols, previous)]
