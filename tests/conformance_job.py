"""One job, every integration: the runs that tests/test_conformance.py holds to the same checks.

``--phase`` names the integration; the test launches the job on 2 gloo CPU processes
(torchrun, or ``accelerate launch`` for Accelerate) and every rank writes
``<out>/<integration>_rank<r>.pt`` (``rank_checks.run_job_phase``). Each integration is an
adapter (``Integration``): ``train(out, resume_from)`` trains in fresh objects with the
integration's own loop and checkpoints (and the model and data of its ``*_job.py``),
recording every optimizer step through ``StepRecorder``; ``bad_checkpoints`` spoils copies
of a checkpoint. One launch runs an integration three ways:

    full      STEPS steps from scratch; rank SKIP_RANK's gradient gets a NaN at step SKIP_AT
              (0-based, in every run); a checkpoint after SAVE_AT steps
    bad       from each damaged or foreign copy of that checkpoint (``BAD_CHECKPOINTS``):
              every rank must raise; the error is recorded
    resumed   from the checkpoint, to STEPS

Run by hand from the repository root, e.g.::

    torchrun --standalone --nproc_per_node 2 tests/conformance_job.py --phase torchrun --out runs/conformance
"""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distlion
from distlion import DistLion, unwrap
from distlion.checkpoint import STATE_FILE_PATTERN
from distlion.worker_exit import exit_worker
from rank_checks import run_job_phase

WORLD = 2
STEPS, SAVE_AT = 6, 3       # optimizer steps; the checkpoint after SAVE_AT of them
SKIP_AT, SKIP_RANK = 4, 1   # 0-based optimizer step at which rank SKIP_RANK's gradient gets a NaN (after the save,
                            # so the resumed run meets it too)
BATCH = 4


# ------------------------------------------------------------------ what every integration records

def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors (DTensors gathered whole) as one fp32 vector, a copy."""
    parts = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]
    return torch.cat([t.detach().float().reshape(-1) for t in parts]).clone()


def gradients(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def momentum(optimizer: Any, params: Iterable[torch.Tensor]) -> torch.Tensor:
    """This rank's DistLion momentum of ``params``, as one vector."""
    inner = unwrap(optimizer)
    return flat(t.to_local() if hasattr(t, "to_local") else t for t in (inner.state[p]["exp_avg"] for p in params))


def poison(grads: list[torch.Tensor], step: int) -> None:
    """At step SKIP_AT, make rank SKIP_RANK's first gradient NaN (every rank must skip that step)."""
    if step == SKIP_AT and dist.get_rank() == SKIP_RANK:
        first = grads[0].to_local() if hasattr(grads[0], "to_local") else grads[0]
        first.view(-1)[0] = float("nan")


class StepRecorder:
    """Facts of one run, one entry per optimizer step: the gradients the optimizer is given, the
    parameters after the step and DistLion's cumulative counters."""

    def __init__(self):
        self.steps: list[dict] = []
        self._pending: dict = {}

    def before_step(self, step: int, params: Iterable[torch.Tensor]) -> None:
        """Call with the 0-based step and the parameters whose gradients DistLion is about to take."""
        self._pending = {"step": step, "grad": flat(gradients(params))}

    def after_step(self, params: Iterable[torch.Tensor], optimizer: Any) -> None:
        stats = unwrap(optimizer).comm_stats
        self.steps.append({**self._pending, "params": flat(params), "bytes_sent": stats.bytes_sent,
                           "exchanges": stats.steps})
        self._pending = {}

    def run(self, state: dict[str, torch.Tensor], numel: int) -> dict:
        """The record of the run: the steps, DistLion's final state on this rank, the number of parameters."""
        return {"steps": self.steps, "state": state, "numel": numel}


# ------------------------------------------------------------------ checkpoints and their damaged copies

@dataclass(frozen=True)
class Checkpoint:
    """Where a run saved: ``root`` holds everything, ``resume`` is what to resume from and ``states`` the
    folder of DistLion's per-rank files (both relative to ``root``)."""

    root: str
    resume: str = "."
    states: str = "."

    def moved(self, root: str) -> "Checkpoint":
        return Checkpoint(root, self.resume, self.states)

    @property
    def resume_path(self) -> str:
        return os.path.normpath(os.path.join(self.root, self.resume))


def _state_files(folder: str) -> list[str]:
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if STATE_FILE_PATTERN.match(name)]


def _cut_in_half(paths: Iterable[str]) -> None:
    for path in paths:
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)


def _truncated(folder: str) -> None:
    _cut_in_half(_state_files(folder))


def _plain(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith("distlion_optimizer"):
            os.remove(os.path.join(folder, name))


def _unfinished(folder: str) -> None:
    """The files of a save whose manifest was never written (a rank died mid-save)."""
    for name in os.listdir(folder):
        if name.startswith("distlion_optimizer") and name.endswith("_manifest.json"):
            os.remove(os.path.join(folder, name))


# case -> how a copy of the checkpoint's per-rank files is spoilt
BAD_CHECKPOINTS: dict[str, Callable[[str], None]] = {
    "truncated": _truncated,         # damaged: every rank's file cut in half
    "without_distlion": _plain,      # foreign: saved without DistLion's files
    "unfinished": _unfinished,       # a save that did not finish: no manifest
}


def spoil_copies(good: Checkpoint, folder: str) -> dict[str, str]:
    """Rank 0 writes a spoilt copy of ``good`` per ``BAD_CHECKPOINTS`` case under ``folder``; return what to
    resume from, per case."""
    copies = {case: good.moved(os.path.join(folder, case)) for case in BAD_CHECKPOINTS}
    if dist.get_rank() == 0:
        for case, copy in copies.items():
            shutil.copytree(good.root, copy.root)
            BAD_CHECKPOINTS[case](os.path.join(copy.root, copy.states))
    dist.barrier()
    return {case: copy.resume_path for case, copy in copies.items()}


# ------------------------------------------------------------------ the integrations

class Integration(Protocol):
    """One way of training with DistLion, as the conformance job drives it."""

    def train(self, out: str, resume_from: str | None) -> tuple[dict, Checkpoint]:
        """Train to STEPS in fresh objects, from scratch (saving after SAVE_AT under ``out``) or from
        ``resume_from``; return the ``StepRecorder.run`` record and where a run from scratch saved."""

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        """Damaged or foreign checkpoints to try: case -> what to resume from."""


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data at ``step``: different on every rank, the same in every run."""
    generator = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    return torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 1, generator=generator)


def init_gloo() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def train_plainly(model: torch.nn.Module, optimizer: Any, steps: range,
                  save: Callable[[], None] | None) -> StepRecorder:
    """The loop of a script without a framework: this rank's batches; ``save()`` after SAVE_AT steps."""
    recorder = StepRecorder()
    for step in steps:
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        poison(gradients(model.parameters()), step)
        recorder.before_step(step, model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        recorder.after_step(model.parameters(), optimizer)
        if save is not None and step + 1 == SAVE_AT:
            save()
    return recorder


class Torchrun:
    """A plain torchrun loop: the model's weights with ``torch.save`` (rank 0), DistLion's with
    ``distlion.save`` / ``distlion.load`` (every rank)."""

    def __init__(self):
        init_gloo()

    def train(self, out: str, resume_from: str | None):
        model = small_model()
        optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
        checkpoint = Checkpoint(os.path.join(out, "ckpt"))

        def save() -> None:
            distlion.save(optimizer, checkpoint.root)
            if dist.get_rank() == 0:
                torch.save(model.state_dict(), os.path.join(checkpoint.root, "model.pt"))
            dist.barrier()

        if resume_from is None:
            recorder = train_plainly(model, optimizer, range(STEPS), save)
        else:
            model.load_state_dict(torch.load(os.path.join(resume_from, "model.pt"), weights_only=True))
            distlion.load(optimizer, resume_from)
            recorder = train_plainly(model, optimizer, range(SAVE_AT, STEPS), None)
        params = list(model.parameters())
        return recorder.run({"momentum": momentum(optimizer, params)}, sum(p.numel() for p in params)), checkpoint

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        return spoil_copies(good, folder)


class Fsdp2Dcp:
    """FSDP2 (``fully_shard``) on a (2 replicas, 1 shard) mesh, DistLion with ``device_mesh``, checkpoints
    through torch.distributed.checkpoint with ``distlion.dcp.sharded_state``."""

    def __init__(self):
        init_gloo()

    def _build(self, replicas: int):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (replicas, WORLD // replicas), mesh_dim_names=("replicate", "shard"))
        model = small_model()
        for module in [model[0], model[2], model]:
            fully_shard(module, mesh=mesh["shard"])
        return model, DistLion(model.parameters(), lr=1e-2, weight_decay=0.1, device_mesh=mesh)

    def train(self, out: str, resume_from: str | None):
        record, checkpoint, _, _ = self._run(out, resume_from)
        return record, checkpoint

    def _run(self, out: str, resume_from: str | None, replicas: int = WORLD, steps: int = STEPS,
             save_at_k: bool = True):
        import torch.distributed.checkpoint as dcp

        from distlion.dcp import sharded_state

        model, optimizer = self._build(replicas)
        checkpoint = Checkpoint(os.path.join(out, "ckpt"))

        def save() -> None:
            dcp.save({"model": model.state_dict(), "optimizer": sharded_state(optimizer)},
                     checkpoint_id=checkpoint.root)

        if resume_from is None:
            recorder = train_plainly(model, optimizer, range(steps), save if save_at_k else None)
        else:
            dcp.load({"model": model.state_dict(), "optimizer": sharded_state(optimizer, checkpoint_id=resume_from)},
                     checkpoint_id=resume_from)
            recorder = train_plainly(model, optimizer, range(SAVE_AT, steps), None)
        params = list(model.parameters())
        record = recorder.run({"momentum": momentum(optimizer, params)}, sum(p.numel() for p in params))
        return record, checkpoint, model, optimizer

    def one_replica_checkpoint(self, folder: str) -> str:
        """A DCP save of a run of 1 replica of 2 shards (another topology)."""
        import torch.distributed.checkpoint as dcp

        from distlion.dcp import sharded_state

        _, _, model, optimizer = self._run(os.path.join(folder, "run"), None, replicas=1, steps=SAVE_AT,
                                           save_at_k=False)
        path = os.path.join(folder, "ckpt")
        dcp.save({"model": model.state_dict(), "optimizer": sharded_state(optimizer)}, checkpoint_id=path)
        return path

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        """DCP's files truncated; a checkpoint of the model alone; one whose save did not finish (no metadata)."""
        import torch.distributed.checkpoint as dcp

        paths = {case: os.path.join(folder, case) for case in BAD_CHECKPOINTS}
        if dist.get_rank() == 0:
            shutil.copytree(good.root, paths["truncated"])
            _cut_in_half(os.path.join(paths["truncated"], name) for name in os.listdir(paths["truncated"])
                         if name.endswith(".distcp"))
        _, _, model, _ = self._run(os.path.join(folder, "run"), None, steps=1, save_at_k=False)
        dcp.save({"model": model.state_dict()}, checkpoint_id=paths["without_distlion"])
        if dist.get_rank() == 0:
            shutil.copytree(good.root, paths["unfinished"])
            os.remove(os.path.join(paths["unfinished"], ".metadata"))
        dist.barrier()
        return paths


class Accelerate:
    """``distlion.accelerate.prepare`` in a stock Accelerate loop (tests/accelerate_job.py's model and data),
    ``accelerator.save_state`` / ``load_state``; a fresh Accelerator for every run."""

    def train(self, out: str, resume_from: str | None):
        from accelerate import Accelerator

        import accelerate_job as job
        import distlion.accelerate

        accelerator = Accelerator()
        model = job.make_model(0)
        optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.05 * s))
        model, optimizer, loader, scheduler = distlion.accelerate.prepare(
            accelerator, model, optimizer, job.make_loader(STEPS, accelerator.num_processes), scheduler)
        start = 0
        if resume_from is not None:
            accelerator.load_state(resume_from)
            start = SAVE_AT
            loader = accelerator.skip_first_batches(loader, start)
        recorder = StepRecorder()
        checkpoint = Checkpoint(os.path.join(out, "ckpt"))
        for step, (x, y) in enumerate(loader, start=start):
            accelerator.backward(F.mse_loss(model(x), y))
            poison(gradients(model.parameters()), step)
            recorder.before_step(step, model.parameters())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            recorder.after_step(model.parameters(), optimizer)
            if resume_from is None and step + 1 == SAVE_AT:
                accelerator.save_state(checkpoint.root)
        params = list(model.parameters())
        record = recorder.run({"momentum": momentum(optimizer, params)}, sum(p.numel() for p in params))
        accelerator.free_memory()
        return record, checkpoint

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        return spoil_copies(good, folder)


class DeepSpeed:
    """``distlion.deepspeed.initialize`` with the shipped bf16 config (tests/deepspeed_job.py's model and data),
    ``engine.save_checkpoint`` / ``load_checkpoint``."""

    def __init__(self):
        import deepspeed_job as job

        init_gloo()  # DeepSpeed's CPU accelerator would ask for oneCCL
        job._prepare(dist.get_rank(), dist.get_world_size())
        self.job = job

    def train(self, out: str, resume_from: str | None):
        from distlion.deepspeed import get_distlion

        job = self.job
        engine, _ = job.new_engine("bf16")
        start = 0
        if resume_from is not None:
            engine.load_checkpoint(resume_from)
            start = SAVE_AT
        recorder = StepRecorder()
        root = os.path.join(out, "ckpt")
        rank = dist.get_rank()
        for step in range(start, STEPS):
            x, y = job.batch(rank, step, torch.bfloat16)
            engine.backward(job.loss_of(engine, x, y))
            poison(gradients(engine.module.parameters()), step)
            recorder.before_step(step, engine.module.parameters())
            engine.step()
            recorder.after_step(engine.module.parameters(), get_distlion(engine))
            if resume_from is None and step + 1 == SAVE_AT:
                engine.save_checkpoint(root)
        state = job.flat_state(engine)  # DistLion's fp32 master weights and momentum
        record = recorder.run({"momentum": state["momentum"], "masters": state["params"]},
                              sum(p.numel() for p in engine.module.parameters()))
        del engine
        gc.collect()
        return record, Checkpoint(root, states=f"global_step{SAVE_AT}")

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        return spoil_copies(good, folder)


class Transformers:
    """``DistLionTrainer`` with ``optimizers=(DistLion(...), None)`` (tests/transformers_job.py's tiny GPT-2,
    bf16, accumulation, clipping, cosine schedule), ``save_steps`` / ``resume_from_checkpoint``."""

    def train(self, out: str, resume_from: str | None):
        from transformers import TrainerCallback

        import transformers_job as job

        class Record(TrainerCallback):
            def __init__(self):
                self.recorder = StepRecorder()

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                poison(gradients(model.parameters()), state.global_step)
                self.recorder.before_step(state.global_step, model.parameters())

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                self.recorder.after_step(model.parameters(), optimizer)

        output_dir = os.path.join(out, "run")
        trainer, _ = job.build(output_dir, max_steps=STEPS, save_steps=SAVE_AT,
                               save_strategy="steps" if resume_from is None else "no")
        record = Record()
        trainer.add_callback(record)
        trainer.train(resume_from_checkpoint=resume_from)
        params = list(trainer.model.parameters())
        result = record.recorder.run({"momentum": momentum(trainer.distlion_optimizer(), params)},
                                     sum(p.numel() for p in params))
        del trainer
        gc.collect()
        return result, Checkpoint(os.path.join(output_dir, f"checkpoint-{SAVE_AT}"))

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        return spoil_copies(good, folder)


class Lightning:
    """``strategy="distlion"`` (tests/lightning_job.py's module and data, bf16-mixed, accumulation, clipping),
    a checkpoint at the end of the first epoch (SAVE_AT steps) and ``fit(ckpt_path=...)``."""

    def train(self, out: str, resume_from: str | None):
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import Callback, ModelCheckpoint
        from torch.utils.data import DataLoader, TensorDataset

        import lightning_job as job
        from distlion.lightning import state_directory

        class Record(Callback):
            def __init__(self):
                self.recorder = StepRecorder()

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                poison(gradients(pl_module.parameters()), trainer.global_step)
                self.recorder.before_step(trainer.global_step, pl_module.parameters())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                    self.recorder.after_step(pl_module.parameters(), trainer.strategy.optimizers[0])

        pl.seed_everything(0, workers=True, verbose=False)
        dataset = job.make_data().dataset  # SAVE_AT optimizer steps per epoch: the checkpoint ends an epoch
        samples = SAVE_AT * job.ACCUMULATE * job.BATCH * WORLD
        data = DataLoader(TensorDataset(*(t[:samples] for t in dataset.tensors)), batch_size=job.BATCH, shuffle=True)
        root = os.path.join(out, "checkpoints")
        record = Record()
        callbacks = [record]
        if resume_from is None:
            callbacks.append(ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1,
                                             save_on_train_epoch_end=True))
        model = job.Regression()
        # max_epochs, not max_steps: with max_steps, Lightning resumes an end-of-epoch checkpoint one batch
        # into the finished epoch instead of at the next one.
        trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="distlion", precision="bf16-mixed",
                             max_epochs=STEPS // SAVE_AT, accumulate_grad_batches=job.ACCUMULATE,
                             gradient_clip_val=job.CLIP,
                             enable_progress_bar=False, enable_model_summary=False, logger=False,
                             enable_checkpointing=resume_from is None, default_root_dir=out, callbacks=callbacks)
        trainer.fit(model, data, ckpt_path=resume_from)
        params = list(model.parameters())
        result = record.recorder.run({"momentum": momentum(trainer.strategy.optimizers[0], params)},
                                     sum(p.numel() for p in params))
        del trainer
        gc.collect()
        name = f"epoch=0-step={SAVE_AT}.ckpt"
        return result, Checkpoint(root, resume=name, states=os.path.relpath(state_directory(os.path.join(root, name)),
                                                                               os.path.realpath(root)))

    def bad_checkpoints(self, good: Checkpoint, folder: str) -> dict[str, str]:
        return spoil_copies(good, folder)


INTEGRATIONS: dict[str, Callable[[], Integration]] = {
    "torchrun": Torchrun, "accelerate": Accelerate, "deepspeed": DeepSpeed, "transformers": Transformers,
    "lightning": Lightning, "fsdp2_dcp": Fsdp2Dcp}


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def conformance(name: str, out: str) -> dict:
    """Run integration ``name`` full, from each bad checkpoint and resumed; return this rank's record."""
    integration = INTEGRATIONS[name]()
    full, good = integration.train(os.path.join(out, "full"), None)
    dist.barrier()  # every rank's files are written
    refusals = {}
    for case, path in integration.bad_checkpoints(good, os.path.join(out, "bad")).items():
        try:
            integration.train(os.path.join(out, f"from_{case}"), path)
            refusals[case] = None
        except Exception as error:
            refusals[case] = describe(error)
        except BaseException as error:  # DCP's CheckpointException is a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            refusals[case] = describe(error)
    other = other_topology(integration, good, os.path.join(out, "other_topology"))
    elastic = None if other is None else integration.train(os.path.join(out, "from_other_topology"), other)[0]
    resumed, _ = integration.train(os.path.join(out, "resumed"), good.resume_path)
    return {"integration": name, "full": full, "resumed": resumed, "refusals": refusals, "elastic": elastic}


def other_topology(integration: Any, good: Checkpoint, folder: str) -> str | None:
    """A copy of ``good`` whose DistLion state is of another topology; return what to resume from: the per-rank
    files re-split for 3 ranks by the offline tool, or (FSDP2) a DCP save of 1 replica of 2 shards. None when the
    files hold a wrapper's state, which the tool refuses to re-split."""
    if isinstance(integration, Fsdp2Dcp):
        return integration.one_replica_checkpoint(folder)
    from distlion.checkpoint.__main__ import reshard
    from distlion.checkpoint.files import Manifest

    copy = good.moved(folder)
    if Manifest.read(os.path.join(good.root, good.states)).plan is None:
        return None
    if dist.get_rank() == 0:
        shutil.copytree(good.root, copy.root)
        states = os.path.join(copy.root, copy.states)
        resharded = os.path.join(folder + "_states")
        reshard(states, resharded, 3, 1, "mean", 0)
        _plain(states)
        for name in os.listdir(resharded):
            shutil.move(os.path.join(resharded, name), os.path.join(states, name))
    dist.barrier()
    return copy.resume_path


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_job_phase({name: (lambda options, name=name: conformance(name, options.out)) for name in INTEGRATIONS})
    exit_worker()
