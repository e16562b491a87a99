"""``distlion.save`` and ``distlion.load``: every rank's optimizer state, for scripts launched with torchrun.

DistLion's momentum differs on every rank, so every rank saves and loads a file of its own
(``distlion_optimizer{index}_rank{rank}_of_{world_size}.pt``, ``distlion.integrations.common``),
beside the model's own checkpoint::

    distlion.save(opt, "ckpt")        # on every rank: its file, then rank 0's manifest
    distlion.load(opt, "ckpt")        # on resume: bitwise on the saved topology, else mapped
    distlion.load(opt, "ckpt", strict=True)   # refuse another topology instead

With ``torch.amp.GradScaler``, ``distlion.scaler_step(scaler, opt)`` stands for
``scaler.step(opt); scaler.update()``: DistLion skips a step on every rank when any rank
overflowed, and every rank's scaler then backs off alike (``scaler.update()`` alone sees this
rank's infs only, and the scales, and any schedule keyed to them, would drift apart).

A rank that cannot load (missing, unreadable or foreign file, another world size, another
model) makes every rank raise, each waiting at most ``DistLion(timeout=...)`` for the others.
"""

from __future__ import annotations

from typing import Any

from distlion.integrations.common import distlion_of, fail_together, load_state, save_state, step_with_agreed_skip

# What load's errors tell the user (load_state fills in the saved run's values).
_FIX = "resume with {world_size} processes (ranks_per_node={ranks_per_node}), or load with strict=False"
_MISSING = "Save it with distlion.save(optimizer, directory) on every rank."


def save(optimizer: Any, directory: str, index: int = 0) -> str:
    """Write this rank's DistLion state to ``directory`` (call it on every rank); return the file's path."""
    inner = distlion_of(optimizer, "distlion.save")
    return save_state(inner.state_dict(), directory, inner, index)


def load(optimizer: Any, directory: str, index: int = 0, strict: bool | None = None) -> None:
    """Load this rank's state from ``directory`` (call it on every rank); every rank raises if any rank cannot.

    On the saved topology each rank loads its own file, bitwise. On another one the saved
    voters' momenta are mapped by ``DistLion(on_topology_change=...)`` (README, Checkpoints);
    ``strict=True`` refuses that instead, ``strict=False`` maps even under ``"refuse"``.
    """
    inner = distlion_of(optimizer, "distlion.load")
    fail_together(lambda: inner.load_state_dict(load_state(directory, inner, index, fix=_FIX, missing=_MISSING,
                                                           strict=strict)),
                  source=directory, timeout=inner.timeout)


def scaler_step(scaler: Any, optimizer: Any) -> Any:
    """``scaler.step(optimizer)`` then ``scaler.update()``, every rank's scale backing off after an agreed skip."""
    inner = distlion_of(optimizer, "distlion.scaler_step")

    def step() -> Any:
        result = scaler.step(optimizer)
        scaler.update()
        return result
    return step_with_agreed_skip(inner, scaler, step)[0]
