"""An Accelerate script under ``accelerate launch --use_deepspeed`` with DistLion, run by tests/test_accelerate.py.

Two ways in, chosen by ``--optimizer``:

    entry   the DeepSpeed config names ``"type": "DistLion"``; the script passes Accelerate's
            ``DummyOptim``, as Accelerate asks when the config holds an optimizer
    client  the config has no optimizer; the script passes a ``DistLion`` instance

Either way the script imports ``distlion.deepspeed`` (which registers DistLion with
``deepspeed.initialize``); ``entry`` calls ``accelerator.prepare``, ``client``
``distlion.accelerate.prepare`` (which is then ``accelerator.prepare``). It trains
2k steps on rank-dependent data with ``save_state`` after step k, then, in the same
launch, builds everything afresh, ``load_state``s step k and trains the last k steps
again. Each rank writes ``<out>/<optimizer>_rank<r>.pt``.

Run by hand from the repository root, e.g.::

    ACCELERATE_USE_CPU=true accelerate launch --use_deepspeed --deepspeed_config_file CONFIG \
        --num_processes 2 tests/accelerate_deepspeed_job.py --optimizer entry --out runs/adj
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DummyOptim, InitProcessGroupKwargs

import distlion.accelerate
import distlion.deepspeed  # noqa: F401  registers "DistLion" with deepspeed.initialize
from distlion import DistLion, unwrap
from distlion.worker_exit import exit_worker

K = 3
BATCH = 8
LR, WEIGHT_DECAY = 1e-2, 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 1, generator=generator)


def gathered_equal(accelerator: Accelerator, tensors) -> bool:
    """Return whether every rank holds bitwise the same tensors (gloo has no all_gather_into_tensor)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    rows = [torch.empty_like(flat) for _ in range(accelerator.num_processes)]
    dist.all_gather(rows, flat)
    return all(torch.equal(rows[0], row) for row in rows[1:])


def build(accelerator: Accelerator, optimizer_kind: str):
    model = make_model()
    if optimizer_kind == "entry":  # Accelerate's own prepare: the import above is all it takes
        return accelerator.prepare(model, DummyOptim(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY))
    optimizer = DistLion(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=WEIGHT_DECAY)
    return distlion.accelerate.prepare(accelerator, model, optimizer)


def train(accelerator: Accelerator, engine, optimizer, steps: range, facts: dict) -> None:
    """A stock Accelerate loop; under DeepSpeed, ``accelerator.backward`` runs the engine's step."""
    def record_gradients(distlion: DistLion, args, kwargs) -> None:  # what DistLion is about to vote on
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for group in distlion.param_groups for p in group["params"]]
        facts["grads_differ"].append(not gathered_equal(accelerator, grads))

    hook = unwrap(optimizer).register_step_pre_hook(record_gradients)
    for step in steps:
        dtype = next(engine.module.parameters()).dtype  # bf16 under "bf16": DeepSpeed casts the model
        x, y = (t.to(dtype) for t in batch(accelerator.process_index, step))
        loss = F.mse_loss(engine(x).float(), y.float())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        facts["params_same"].append(gathered_equal(accelerator, list(engine.module.parameters())))
    hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["entry", "client"], required=True)
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    # Without a GPU, Accelerate names no backend for a DeepSpeed job (it would count 1 process): name gloo.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    facts: dict = {"grads_differ": [], "params_same": []}
    engine, optimizer = build(accelerator, options.optimizer)
    inner = unwrap(optimizer)
    facts["is_distlion"] = isinstance(inner, DistLion)
    facts["engine_allreduce"] = engine.enable_backward_allreduce
    train(accelerator, engine, optimizer, range(K), facts)
    checkpoint = os.path.join(options.out, f"{options.optimizer}_ckpt")
    accelerator.save_state(checkpoint)
    train(accelerator, engine, optimizer, range(K, 2 * K), facts)
    facts.update(params=[p.detach().clone() for p in engine.module.parameters()], comm=inner.comm_stats.as_dict(),
                 numel=sum(p.numel() for p in engine.module.parameters()), world_size=accelerator.num_processes,
                 files=sorted(os.listdir(os.path.join(checkpoint, "pytorch_model"))))

    accelerator.free_memory()  # forget the first engine: load_state restores every prepared model
    engine, optimizer = build(accelerator, options.optimizer)  # fresh objects, then resume at step K
    accelerator.load_state(checkpoint)
    train(accelerator, engine, optimizer, range(K, 2 * K), {"grads_differ": [], "params_same": []})
    facts["resumed_params"] = [p.detach().clone() for p in engine.module.parameters()]
    torch.save(facts, os.path.join(options.out, f"{options.optimizer}_rank{accelerator.process_index}.pt"))


if __name__ == "__main__":
    main()
    exit_worker()
