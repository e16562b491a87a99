"""A stock Lightning script with DistLion, launched by tests/test_lightning.py.

It trains a small MLP on a regression task on 2 CPU processes (gloo) with bf16-mixed,
gradient accumulation, gradient clipping, a per-step LR schedule and a checkpoint at the
end of every epoch. It differs from a DDP + AdamW script in the lines the README shows
(``import distlion.lightning``, ``DistLion(...)`` in ``configure_optimizers``,
``strategy="distlion"``); the ``Recorder`` callback and ``configure_gradient_clipping``
record facts for the tests, and rank 1 makes one gradient NaN at step SKIP_AT (every rank
must skip). Each rank writes ``<out>/<phase>_rank<r>.pt``. Phases:

    train   EPOCHS epochs from scratch (Lightning's own launcher starts rank 1), a
            checkpoint after each epoch; then 3 steps under "16-mixed" (GradScaler on CPU)
            with a NaN on rank 1, and 2 steps of strategy="distlion" with AdamW
    resume  fit(ckpt_path=...) from checkpoints that must fail (--bad-ckpt, each on every
            rank), then from --ckpt (the first epoch's) to EPOCHS, in a fresh launch

Run by hand from the repository root, e.g.::

    python tests/lightning_job.py --phase train --out runs/lj
    torchrun --standalone --nproc_per_node 2 tests/lightning_job.py --phase resume --out runs/lj \
        --ckpt "runs/lj/checkpoints/epoch=0-step=4.ckpt"
"""

from __future__ import annotations

import gc
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

import distlion.lightning  # noqa: F401  registers strategy="distlion"
from distlion import DistLion
from distlion.lightning import DistLionStrategy
from distlion.worker_exit import exit_worker
from rank_checks import run_job_phase

WORLD = 2
EPOCHS, STEPS_PER_EPOCH = 2, 4   # optimizer steps; the checkpoint of epoch 0 is step STEPS_PER_EPOCH
ACCUMULATE, BATCH = 2, 4         # accumulate_grad_batches, per-rank batch size
SAMPLES = STEPS_PER_EPOCH * ACCUMULATE * BATCH * WORLD
FEATURES = 8
LR, CLIP = 0.02, 0.5
SKIP_AT, SKIP_RANK = 1, 1        # global_step (0-based) at which rank SKIP_RANK's gradient gets a NaN

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")


def lr_factor(step: int) -> float:
    return 1.0 - step / (2 * EPOCHS * STEPS_PER_EPOCH)


class Regression(pl.LightningModule):
    def __init__(self, optimizer: str = "distlion"):
        super().__init__()
        self.optimizer_name = optimizer
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.recorder: Recorder | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        if self.recorder is not None:
            self.recorder.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        else:
            optimizer = DistLion(self.parameters(), lr=LR, weight_decay=0.01)  # was AdamW(...)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.recorder is not None:
            self.recorder.after_clipping(self)


def make_data() -> DataLoader:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, 1, generator=generator)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(SAMPLES, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def same_on_all_ranks(tensors) -> bool:
    """Return whether every rank holds bitwise the same tensors (NaN compares unequal)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def distlion_of(trainer: pl.Trainer) -> DistLion | None:
    optimizer = trainer.strategy.optimizers[0]
    return optimizer if isinstance(optimizer, DistLion) else None


class Recorder(Callback):
    """Facts per optimizer step: gradients as the optimizer gets them (after clipping), parameters after the step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.micro_votes: list[int] = []  # DistLion's step count after every batch
        self.pending: dict = {}
        self.losses: list[float] = []  # every batch's loss (Regression.training_step)

    def on_train_start(self, trainer, pl_module):
        self.model_type = type(trainer.strategy.model).__name__  # while training: DDP's wrapper

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters()]
        if trainer.global_step == SKIP_AT and trainer.global_rank == SKIP_RANK and distlion_of(trainer) is not None:
            grads[0].view(-1)[0] = float("nan")
        self.pending = {"local_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()}

    def after_clipping(self, pl_module):
        grads = [p.grad for p in pl_module.parameters()]
        self.pending.update(grads_same=same_on_all_ranks(grads),
                            clipped_norm=torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = distlion_of(trainer)
        if optimizer is not None:
            self.micro_votes.append(optimizer.comm_stats.steps)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        facts = {**self.pending, "global_step": trainer.global_step,
                 "lr": trainer.strategy.optimizers[0].param_groups[0]["lr"],
                 "params_same": same_on_all_ranks(list(pl_module.parameters())),
                 "params_sum": sum(p.double().sum().item() for p in pl_module.parameters())}
        if optimizer is not None:
            facts.update(votes=optimizer.comm_stats.steps, skipped=optimizer.comm_stats.skipped_steps,
                         bytes_sent=optimizer.comm_stats.bytes_sent)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            facts["scale"] = scaler.get_scale()
            facts["scales_same"] = same_on_all_ranks([torch.tensor([scaler.get_scale()])])
        self.steps.append(facts)


def build(out: str, name: str, *, strategy="distlion", optimizer="distlion", **overrides):
    pl.seed_everything(0, workers=True, verbose=False)
    model = Regression(optimizer)
    recorder = model.recorder = Recorder()
    settings = dict(accelerator="cpu", devices=WORLD, strategy=strategy, precision="bf16-mixed",
                    max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
                    log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=os.path.join(out, name), callbacks=[recorder],
                    logger=CSVLogger(out, name=name, version=0))
    settings.update(overrides)
    settings["callbacks"] = [recorder, *overrides.get("callbacks", [])]
    return pl.Trainer(**settings), model, recorder


def final_facts(trainer: pl.Trainer, model: Regression, recorder: Recorder) -> dict:
    optimizer = distlion_of(trainer)
    params = list(model.parameters())
    return {"params": [p.detach().clone() for p in params],
            "momentum": [optimizer.state[p]["exp_avg"].clone() for p in params],
            "steps": recorder.steps, "micro_votes": recorder.micro_votes, "losses": recorder.losses,
            "comm": optimizer.comm_stats.as_dict(), "numel": sum(p.numel() for p in params),
            "global_step": trainer.global_step, "model_type": recorder.model_type,
            "strategy_type": type(trainer.strategy).__name__, "precision": trainer.precision,
            "logged_metrics": {k: v.item() for k, v in trainer.logged_metrics.items()},
            "callbacks": [type(cb).__name__ for cb in trainer.callbacks]}


def train_phase(out: str) -> dict:
    per_epoch = ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"), every_n_epochs=1, save_top_k=-1,
                                save_on_train_epoch_end=True)
    latest = ModelCheckpoint(dirpath=os.path.join(out, "latest"), every_n_train_steps=2, save_top_k=1)
    trainer, model, recorder = build(out, "train", callbacks=[per_epoch, latest])
    trainer.fit(model, make_data())
    result = final_facts(trainer, model, recorder)
    del trainer, model
    gc.collect()

    # "16-mixed" with torch's CPU GradScaler: the NaN on rank 1 at SKIP_AT must back off every rank's scale.
    trainer, model, recorder = build(out, "fp16", precision=None, plugins=[MixedPrecision("16-mixed", "cpu")],
                                     max_epochs=-1, max_steps=3, logger=False, enable_checkpointing=False)
    trainer.fit(model, make_data())
    result["fp16"] = {"steps": recorder.steps, "comm": distlion_of(trainer).comm_stats.as_dict(),
                      "plugin": type(trainer.precision_plugin).__name__}
    del trainer, model
    gc.collect()

    # Any other optimizer: the strategy is DDP (gradients all-reduced).
    trainer, model, recorder = build(out, "adamw", optimizer="adamw", max_epochs=-1, max_steps=2, logger=False,
                                     enable_checkpointing=False)
    trainer.fit(model, make_data())
    result["adamw"] = {"steps": recorder.steps, "callbacks": [type(cb).__name__ for cb in trainer.callbacks]}
    return result


def resume_phase(out: str, ckpt: str, bad_ckpts: list[str]) -> dict:
    errors = {}
    for bad in bad_ckpts:
        trainer, model, _ = build(out, "bad", logger=False, enable_checkpointing=False)
        try:
            trainer.fit(model, make_data(), ckpt_path=bad)
        except Exception as error:  # every rank must raise, none may hang
            errors[os.path.basename(os.path.dirname(bad))] = f"{type(error).__name__}: {error}"
        del trainer, model
        gc.collect()
    trainer, model, recorder = build(out, "resume", strategy=DistLionStrategy(), enable_checkpointing=False)
    trainer.fit(model, make_data(), ckpt_path=ckpt)
    return {**final_facts(trainer, model, recorder), "errors": errors}


if __name__ == "__main__":
    run_job_phase({"train": lambda options: train_phase(options.out),
                   "resume": lambda options: resume_phase(options.out, options.ckpt, options.bad_ckpt)})
    exit_worker()
