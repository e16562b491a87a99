"""Hugging Face Trainer adapter: ``DistLionTrainer``, a ``transformers.Trainer`` that votes.

A stock Trainer script changes two lines (create the TrainingArguments first: they
start torch.distributed, which DistLion needs at construction)::

    from distlion.transformers import DistLionTrainer                     # was: from transformers import Trainer

    args = TrainingArguments(output_dir="out", save_steps=500, ...)
    optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1)
    trainer = DistLionTrainer(model=model, args=args, train_dataset=data,  # was Trainer(...)
                              optimizers=(optimizer, None))
    trainer.train()                                                       # or train(resume_from_checkpoint=...)

``DistLionTrainer(..., optimizer_cls_and_kwargs=(DistLion, {"lr": 1e-4}))`` works too
(Trainer's two param groups: weight decay ``args.weight_decay`` and 0). Launch as always
(``torchrun --nproc_per_node N train.py``, ``accelerate launch``). It takes Trainer's
arguments and, with any other optimizer, is Trainer. With a DistLion optimizer:

- Gradients stay local: the model Trainer wraps in DDP gets a comm hook that hands each
  rank back its own gradients (``distlion.accelerate.prepare``); DistLion exchanges 1 bit
  per parameter instead. Trainer's ``no_sync`` micro-steps under
  ``gradient_accumulation_steps`` accumulate locally as before, and ``max_grad_norm``
  clips each rank's own gradients (the norm Trainer logs is rank 0's).
- Checkpoints (``save_steps``, ``save_strategy``) hold every rank's optimizer state,
  ``distlion_optimizer0_rank{r}_of_{N}.pt`` (``distlion.checkpoint``), written by each
  rank, instead of rank 0's ``optimizer.pt``; ``resume_from_checkpoint`` gives each rank
  its own. A checkpoint without them, or from another number of processes, fails on
  every rank with an error that says what it found and what to do.
- Trainer's logs (``log_history``, the console, every ``report_to`` tracker) carry
  DistLion's communication figures, ``distlion/bytes_sent`` etc. (``LOGGED_STATS``).

Your own Trainer subclass gets the same by mixing in ``DistLionMixin`` first::

    class MyTrainer(DistLionMixin, MyBaseTrainer): ...
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from transformers import Trainer
    from transformers.trainer import SCHEDULER_NAME
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("distlion.transformers needs Hugging Face transformers: pip install 'distlion[transformers]'"
                      ) from error

import distlion.accelerate
from distlion import checkpoint
from distlion.comm import CommStats
from distlion.optim import DistLion
from distlion.wrappers import unwrap

__all__ = ["DistLionMixin", "DistLionTrainer", "LOGGED_STATS", "comm_logs"]

# comm_stats fields added to every entry Trainer logs, as "distlion/<field>".
LOGGED_STATS = CommStats.LOGGED
# What load_state's errors tell the user (distlion.checkpoint.load_state fills in the saved world size).
_FIX = ("relaunch with {world_size} processes in all (torchrun --nproc_per_node, accelerate launch --num_processes), "
        "or load the model weights only (from_pretrained(checkpoint)) and train without resume_from_checkpoint")
_MISSING = ("The checkpoint was saved without DistLion's per-rank optimizer files (by a plain Trainer, or with "
            "save_only_model=True): resume from a checkpoint saved by DistLionTrainer, or load the model weights "
            "only (from_pretrained(checkpoint)) and train without resume_from_checkpoint.")


def comm_logs(optimizer: Any, prefix: str = "distlion/") -> dict[str, float]:
    """Return the ``LOGGED_STATS`` of ``optimizer``'s ``comm_stats`` (DistLion or a wrapper of one), named for logs."""
    inner = unwrap(optimizer)
    if inner is None:
        raise TypeError(f"comm_logs needs a DistLion optimizer (or a wrapper of one); got {type(optimizer).__name__}")
    return inner.comm_stats.logged(prefix)


class DistLionMixin:
    """What ``DistLionTrainer`` adds to ``transformers.Trainer``; put it first among the bases of your own subclass.

    Every method falls through to Trainer's when the optimizer is not a DistLion.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given_distlion = self.distlion_optimizer()  # from optimizers=(DistLion(...), None)

    def distlion_optimizer(self) -> DistLion | None:
        """Return the DistLion this Trainer steps (inside Accelerate's or DeepSpeed's wrappers), or None."""
        return unwrap(getattr(self, "optimizer", None))

    # ------------------------------------------------------------------ local gradients

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_deepspeed_enabled:
            # The engine keeps gradients local and saves every rank's state (distlion.deepspeed).
            import distlion.deepspeed  # noqa: F401  registers "DistLion" with deepspeed.initialize
        else:
            _route_prepare(self.accelerator)

    def create_optimizer(self) -> Any:
        # Under deepspeed=, Trainer forgets the optimizer it was given and would build AdamW in its place.
        if self.optimizer is None and self._given_distlion is not None:
            self.optimizer = self._given_distlion
        return super().create_optimizer()

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        optimizer = self.distlion_optimizer()
        if optimizer is None or self.is_deepspeed_enabled:  # the engine's save_checkpoint saves every rank's
            return super()._save_optimizer_and_scheduler(output_dir)
        checkpoint.save_state(optimizer.state_dict(), output_dir, optimizer)  # every rank its own file
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, resume_from: str | None) -> None:
        optimizer = self.distlion_optimizer()
        if optimizer is None or resume_from is None or self.is_deepspeed_enabled:  # the engine loaded every rank's
            return super()._load_optimizer_and_scheduler(resume_from)

        def load() -> None:
            optimizer.load_state_dict(checkpoint.load_state(resume_from, optimizer, fix=_FIX, missing=_MISSING))
            path = os.path.join(resume_from, SCHEDULER_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"{resume_from} holds DistLion's optimizer state but no {SCHEDULER_NAME}: resume "
                                 "from a complete checkpoint saved by DistLionTrainer.")
            self.lr_scheduler.load_state_dict(checkpoint.load_file(path, kind="LR scheduler state"))

        checkpoint.fail_together(load, source=resume_from)

    # ------------------------------------------------------------------ logs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        optimizer = self.distlion_optimizer()
        if optimizer is not None:
            logs = {**logs, **comm_logs(optimizer)}
        return super().log(logs, *args, **kwargs)


class DistLionTrainer(DistLionMixin, Trainer):
    """``transformers.Trainer`` for DistLion: same arguments, same use; see the module's docstring.

    Example::

        optimizer = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1)
        trainer = DistLionTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
        trainer.train(resume_from_checkpoint=True)
    """


def _route_prepare(accelerator: Any) -> None:
    """Send this Accelerator's ``prepare`` calls that hold a DistLion through ``distlion.accelerate.prepare``.

    Trainer prepares the model and the optimizer in one ``accelerator.prepare`` call; the
    adapter then stops DDP's all-reduce on that model (and reports DistLion's agreed skips
    as ``optimizer_step_was_skipped``). Calls without a DistLion, and the adapter's own
    call back into ``prepare``, go to Accelerate unchanged. Only this instance is changed.
    """
    accelerated_prepare = accelerator.prepare
    inside = False

    def prepare(*objects: Any, device_placement: list[bool] | None = None) -> Any:
        nonlocal inside
        optimizers = [unwrap(obj) for obj in objects if unwrap(obj) is not None]
        if inside or not optimizers:
            return accelerated_prepare(*objects, device_placement=device_placement)
        for optimizer in optimizers:
            if accelerator.num_processes > 1 and optimizer.world_size == 1:
                raise ValueError(f"DistLion was built with world size 1 but this job has {accelerator.num_processes} "
                                 "processes: it was created before torch.distributed was initialised. Create the "
                                 "TrainingArguments first (they start it), then DistLion, then the Trainer.")
        inside = True
        try:
            prepared = distlion.accelerate.prepare(accelerator, *objects, device_placement=device_placement)
        finally:
            inside = False
        return prepared

    accelerator.prepare = prepare
