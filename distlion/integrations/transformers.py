"""Hugging Face Trainer: ``DistLionTrainer``, a ``transformers.Trainer`` that votes.

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
  rank back its own gradients; DistLion exchanges 1 bit per parameter instead, and a step
  DistLion skipped on every rank (a non-finite gradient on any rank) is reported as
  skipped, so the LR schedule holds on all ranks. Trainer's ``no_sync`` micro-steps under
  ``gradient_accumulation_steps`` accumulate locally as before, and ``max_grad_norm``
  clips each rank's own gradients (the norm Trainer logs is rank 0's).
- Checkpoints (``save_steps``, ``save_strategy``) hold every rank's optimizer state,
  ``distlion_optimizer0_rank{r}_of_{N}.pt``, written by each rank, instead of rank 0's
  ``optimizer.pt``; ``resume_from_checkpoint`` gives each rank its own. A checkpoint
  without them, or from another number of processes, fails on every rank with an error
  that says what it found and what to do (each rank waits at most ``DistLion(timeout=...)``
  for the others).
- Trainer's logs (``log_history``, the console, every ``report_to`` tracker) carry
  DistLion's communication figures, ``distlion/bytes_sent`` etc. (``LOGGED_STATS``).

Your own Trainer subclass gets the same by mixing in ``DistLionMixin`` first::

    class MyTrainer(DistLionMixin, MyBaseTrainer): ...
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from distlion.integrations import activate
from distlion.integrations.common import (LOGGED_STATS, UnsupportedSetupError, check_built_distributed,
                                          comm_metrics, fail_together, keep_gradients_local, load_file, load_state,
                                          needs, owned_parameters, report_agreed_skips, save_state, unwrap)
from distlion.optim import DistLion

with needs("Hugging Face transformers", "transformers"):
    from transformers import Trainer
    from transformers.trainer import SCHEDULER_NAME

__all__ = ["DistLionMixin", "DistLionTrainer", "LOGGED_STATS", "comm_logs"]

# DistLion's communication figures for Trainer's logs: LOGGED_STATS, as "distlion/<field>".
comm_logs = comm_metrics
# What load_state's errors tell the user (common.load_state fills in the saved world size).
_FIX = ("relaunch with {world_size} processes in all (torchrun --nproc_per_node, accelerate launch --num_processes), "
        "or load the model weights only (from_pretrained(checkpoint)) and train without resume_from_checkpoint")
_MISSING = ("The checkpoint was saved without DistLion's per-rank optimizer files (by a plain Trainer, or with "
            "save_only_model=True): resume from a checkpoint saved by DistLionTrainer, or load the model weights "
            "only (from_pretrained(checkpoint)) and train without resume_from_checkpoint.")


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
            activate("deepspeed")  # registers "DistLion" with deepspeed.initialize
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
        save_state(optimizer.state_dict(), output_dir, optimizer)  # every rank its own file
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, resume_from: str | None) -> None:
        optimizer = self.distlion_optimizer()
        if optimizer is None or resume_from is None or self.is_deepspeed_enabled:  # the engine loaded every rank's
            return super()._load_optimizer_and_scheduler(resume_from)

        def load() -> None:
            optimizer.load_state_dict(load_state(resume_from, optimizer, fix=_FIX, missing=_MISSING))
            path = os.path.join(resume_from, SCHEDULER_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"{resume_from} holds DistLion's optimizer state but no {SCHEDULER_NAME}: resume "
                                 "from a complete checkpoint saved by DistLionTrainer.")
            self.lr_scheduler.load_state_dict(load_file(path, kind="LR scheduler state"))

        fail_together(load, source=resume_from, timeout=optimizer.timeout)

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
    """Make this Accelerator's ``prepare`` keep DistLion's gradients local and report its agreed skips.

    Trainer prepares the model and the optimizer in one ``accelerator.prepare`` call; after
    it, the DDP model that holds DistLion's parameters gets the local-gradient comm hook and
    Accelerate's optimizer wrapper reports DistLion's skips (``optimizer_step_was_skipped``,
    which decides whether Trainer steps the LR scheduler). Calls without a DistLion go to
    Accelerate unchanged. Only this instance is changed.
    """
    accelerated_prepare = accelerator.prepare

    def prepare(*objects: Any, device_placement: list[bool] | None = None) -> Any:
        optimizers = [unwrap(obj) for obj in objects if unwrap(obj) is not None]
        kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
        if optimizers and kind in ("FSDP", "MEGATRON_LM", "XLA"):
            raise UnsupportedSetupError(f"DistLionTrainer runs DistLion under DDP or DeepSpeed (ZeRO stage 0-2); "
                                        f"this Trainer's Accelerator uses {kind}. For FSDP2, shard the model "
                                        f"yourself and use distlion.accelerate.prepare in your own loop.")
        for optimizer in optimizers:
            check_built_distributed(optimizer, accelerator.num_processes, "Create the TrainingArguments first (they "
                                    "start it), then DistLion, then the Trainer.")
        prepared = accelerated_prepare(*objects, device_placement=device_placement)
        if optimizers:
            owned = owned_parameters(optimizers)
            for obj in prepared if len(objects) > 1 else (prepared,):
                if isinstance(obj, DistributedDataParallel) and any(id(p) in owned for p in obj.parameters()):
                    keep_gradients_local(obj, owned)
                elif unwrap(obj) is not None and obj is not unwrap(obj):
                    report_agreed_skips(obj)
        return prepared

    accelerator.prepare = prepare
