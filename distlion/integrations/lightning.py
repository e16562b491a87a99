"""PyTorch Lightning: the ``"distlion"`` strategy, DDP whose gradients stay on each rank.

A Lightning script changes three lines (import this module before building the Trainer:
it registers the strategy name)::

    import distlion.lightning                                            # registers strategy="distlion"

    class Model(L.LightningModule):
        def configure_optimizers(self):
            optimizer = DistLion(self.parameters(), lr=1e-4, weight_decay=0.1)   # was AdamW(...)
            return {"optimizer": optimizer, "lr_scheduler": ...}

    trainer = L.Trainer(strategy="distlion", accelerator="cpu", devices=2)  # was strategy="ddp"
    trainer.fit(model, ckpt_path=...)                                      # resumes bit for bit

``DistLionStrategy(...)`` takes ``DDPStrategy``'s arguments (``find_unused_parameters``,
``static_graph``, ``start_method``, ...) and launches as DDP does (Lightning's own launcher,
``torchrun``, SLURM). With a DistLion optimizer from ``configure_optimizers``:

- Gradients stay local: DDP gets torch's ``noop_hook`` as its comm hook on every device
  (Lightning's ``DDPStrategy(ddp_comm_hook=...)`` registers hooks on CUDA only), so each rank
  keeps its own gradients and DistLion exchanges 1 bit per parameter instead.
  ``accumulate_grad_batches`` votes once per optimizer step; ``gradient_clip_val`` clips each
  rank's own gradients (the norm is per rank).
- Checkpoints: Lightning writes ``<name>.ckpt`` from rank 0 only, and momentum differs on
  every rank, so every rank also writes its own ``<name>.ckpt.distlion/distlion_optimizer{i}_rank{r}_of_{N}.pt``;
  the ``.ckpt`` keeps DistLion's hyperparameters only.
  ``fit(ckpt_path=...)`` gives each rank its own file; missing files, or files of another
  number of processes, fail on every rank with an error that says what was found (each rank
  waits at most ``DistLion(timeout=...)`` for the others).
  ``ModelCheckpoint(save_top_k=...)`` removes the files with their checkpoint.
- Skips: a non-finite gradient on any rank makes every rank skip the step (DistLion's
  agreed skip), so ``global_step`` and the LR schedulers advance alike on all ranks; under
  "16-mixed" the GradScaler backs off on every rank. Gradients are unscaled before
  clipping (Lightning's own mixed precision refuses to clip DistLion's gradients).
- Logs: every training batch logs DistLion's communication figures (``LOGGED_STATS``) as
  ``distlion/bytes_sent`` etc. through ``LightningModule.log`` (``CommMetricsCallback``;
  ``DistLionStrategy(log_comm_stats=False)`` turns it off).

With any other optimizer the strategy is ``DDPStrategy`` (DDP all-reduces) and warns.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from distlion.checkpoint.files import remove_files
from distlion.integrations.common import (LOGGED_STATS, UnsupportedSetupError, check_built_distributed,
                                          comm_metrics, fail_together, keep_gradients_local, load_state, needs,
                                          owned_parameters, save_state, shortest_timeout,
                                          step_with_agreed_skip, unwrap)
from distlion.optim import DistLion

with needs("PyTorch Lightning 2.2 or later", "lightning"):
    import lightning.pytorch as pl
    from lightning.fabric.utilities.optimizer import _optimizer_to_device
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities import GradClipAlgorithmType

__all__ = ["CommMetricsCallback", "DistLionStrategy", "LOGGED_STATS", "STRATEGY_NAME", "comm_logs", "state_directory"]

logger = logging.getLogger("distlion.lightning")  # the name users configure logging by

STRATEGY_NAME = "distlion"
# DistLion's communication figures logged on every training batch: LOGGED_STATS, as "distlion/<field>".
comm_logs = comm_metrics
STATE_SUFFIX = ".distlion"  # <checkpoint>.ckpt.distlion/: every rank's DistLion state for that checkpoint
# What load_state's errors tell the user (common.load_state fills in the saved world size).
_FIX = ("relaunch with {world_size} processes in all (Trainer(devices=..., num_nodes=...)), or load the model weights "
        "only (LightningModule.load_from_checkpoint) and fit without ckpt_path")
_MISSING = ("The checkpoint was saved without DistLion's per-rank optimizer files (by another strategy than "
            "\"distlion\", or with save_weights_only=True): resume from a checkpoint saved with strategy=\"distlion\", "
            "or load the model weights only (LightningModule.load_from_checkpoint) and fit without ckpt_path.")
_DDP_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


def state_directory(checkpoint_path: Any) -> str:
    """Return the directory that holds every rank's DistLion state for the Lightning checkpoint ``checkpoint_path``.

    A symlink (``ModelCheckpoint(save_last="link")``) is followed to the checkpoint it names.
    """
    return os.path.realpath(os.fspath(checkpoint_path)) + STATE_SUFFIX


class CommMetricsCallback(Callback):
    """Log DistLion's communication figures on every training batch (``distlion/bytes_sent`` etc.).

    ``DistLionStrategy`` adds one to the Trainer; with another strategy add it yourself:
    ``Trainer(callbacks=[CommMetricsCallback()])``. Values are float64 tensors (exact byte
    counts), logged on step only, without a cross-rank reduction (every rank has the same).
    """

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics: dict[str, torch.Tensor] = {}
        for index, optimizer in enumerate(_distlions(trainer.strategy.optimizers)):
            prefix = "distlion/" if index == 0 else f"distlion{index}/"
            metrics.update({name: torch.tensor(float(value), dtype=torch.float64)
                            for name, value in comm_logs(optimizer, prefix).items()})
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


class DistLionStrategy(DDPStrategy):
    """``DDPStrategy`` for DistLion: local gradients, per-rank optimizer state files; see the module's docstring.

    Args:
        log_comm_stats: add a ``CommMetricsCallback`` to the Trainer (once).
        **kwargs: ``DDPStrategy``'s arguments, except its comm hooks and model averaging,
            which DistLion replaces.

    Example::

        trainer = L.Trainer(strategy=DistLionStrategy(static_graph=True), accelerator="gpu", devices=8)
    """

    strategy_name = STRATEGY_NAME

    def __init__(self, *args: Any, log_comm_stats: bool = True, **kwargs: Any) -> None:
        given = [name for name in _DDP_HOOK_ARGS if kwargs.get(name) is not None]
        if given:
            raise UnsupportedSetupError(f"DistLionStrategy replaces DDP's gradient communication: remove "
                                        f"{', '.join(given)} (DistLion exchanges 1-bit signs; DDP hands each rank "
                                        f"back its own gradients).")
        super().__init__(*args, **kwargs)
        self.log_comm_stats = log_comm_stats
        self._resume_path: str | None = None

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(STRATEGY_NAME, cls, description="DDP with DistLion's 1-bit vote instead of "
                                       "the gradient all-reduce (distlion.lightning)")

    # ------------------------------------------------------------------ local gradients

    def _register_ddp_hooks(self) -> None:
        """DistLion's hook goes on in ``setup``, once the optimizers are known."""

    def setup(self, trainer: "pl.Trainer") -> None:
        plugin = self.precision_plugin
        if type(plugin) is MixedPrecision:  # Lightning's own refuses to clip DistLion's gradients
            self.precision_plugin = _DistLionMixedPrecision(plugin.precision, plugin.device, plugin.scaler)
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        distlions = _distlions(self.optimizers)
        if not distlions:
            logger.warning("strategy=\"distlion\" without a DistLion optimizer: DDP all-reduces the gradients as "
                           "DDPStrategy does. Return DistLion(self.parameters(), ...) from configure_optimizers.")
            return
        for optimizer in distlions:
            check_built_distributed(optimizer, self.world_size, "Build it in configure_optimizers, not in the "
                                    "LightningModule's __init__.")
        assert isinstance(self.model, DistributedDataParallel)
        keep_gradients_local(self.model, owned_parameters(distlions))
        if self.log_comm_stats and not any(isinstance(cb, CommMetricsCallback) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, CommMetricsCallback())  # before ModelCheckpoint, which Lightning puts last

    # ------------------------------------------------------------------ skips

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        inner = unwrap(optimizer)
        if inner is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        result, _ = step_with_agreed_skip(inner, getattr(self.precision_plugin, "scaler", None),
                                          lambda: super(DistLionStrategy, self).optimizer_step(optimizer, closure,
                                                                                               model, **kwargs))
        return result

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Every rank writes its own DistLion state beside ``filepath``; then rank 0 writes Lightning's file."""
        states = checkpoint.get("optimizer_states")
        distlions = [(index, unwrap(opt)) for index, opt in enumerate(self.optimizers) if unwrap(opt) is not None]
        if states is not None and distlions:
            path = os.fspath(filepath)
            if "://" in path:
                raise UnsupportedSetupError(f"DistLion writes every rank's optimizer state beside the checkpoint, in "
                                            f"a directory of the local (or a mounted, shared) file system; {path} is "
                                            f"not one. Give ModelCheckpoint a local dirpath.")
            directory = state_directory(path)

            def write() -> None:
                for number, (_, optimizer) in enumerate(distlions):
                    save_state(optimizer.state_dict(), directory, optimizer, number)

            fail_together(write, source=directory, timeout=shortest_timeout(opt for _, opt in distlions),
                          doing="save DistLion's optimizer state to")
            states = list(states)
            for index, optimizer in distlions:  # the .ckpt keeps the hyperparameters; momentum is in the files
                states[index] = {"state": {}, "param_groups": optimizer.state_dict()["param_groups"],
                                 "distlion_state_files": os.path.basename(directory)}
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove this rank's DistLion files with the checkpoint (``ModelCheckpoint(save_top_k=...)``)."""
        super().remove_checkpoint(filepath)
        directory = state_directory(filepath)
        for number, _ in enumerate(_distlions(self.optimizers)):
            remove_files(directory, number)
        try:
            os.rmdir(directory)  # the last rank to get here removes it
        except OSError:
            pass

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._resume_path = os.fspath(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Give each rank its own DistLion state (every rank raises if any rank cannot), the others Lightning's."""
        distlions = _distlions(self.optimizers)
        if not distlions:
            return super().load_optimizer_state_dict(checkpoint)
        directory = state_directory(self._resume_path) if self._resume_path else "(no checkpoint path)"

        def load() -> None:
            number = 0
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
                inner = unwrap(optimizer)
                if inner is None:  # another optimizer beside DistLion: Lightning's way
                    optimizer.load_state_dict(state)
                    _optimizer_to_device(optimizer, self.root_device)
                    continue
                inner.load_state_dict(load_state(directory, inner, number, fix=_FIX, missing=_MISSING))
                number += 1

        fail_together(load, source=directory, timeout=shortest_timeout(distlions))


def _distlions(optimizers: Any) -> list[DistLion]:
    return [inner for inner in map(unwrap, optimizers) if inner is not None]


class _DistLionMixedPrecision(MixedPrecision):
    """``MixedPrecision`` that clips DistLion's gradients; under "16-mixed" it unscales them first.

    DistLion takes GradScaler's ``grad_scale``/``found_inf`` in ``step()``
    (``_step_supports_amp_scaling``), which Lightning reads as "a fused optimizer: cannot
    clip" (under "bf16-mixed" too). Here the gradients are unscaled before
    ``on_before_optimizer_step`` and clipping, as for other optimizers; DistLion then gets
    ``found_inf`` alone, and the skip stays agreed by all ranks.
    """

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None or unwrap(optimizer) is None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        closure()
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        # Every rank steps, even one whose training_step returned None (its gradients count as zero):
        # DistLion's step is a collective.
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return step_output

    def clip_gradients(self, optimizer: Any, clip_val: Any = 0.0,
                       gradient_clip_algorithm: Any = GradClipAlgorithmType.NORM) -> Any:
        if unwrap(optimizer) is None:
            return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        return Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)  # gradients are unscaled


DistLionStrategy.register_strategies(StrategyRegistry)
