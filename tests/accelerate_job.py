"""A stock Accelerate training script with DistLion, launched by tests/test_accelerate.py.

It differs from an AdamW script in the two lines the README shows (the optimizer and
``distlion.accelerate.prepare``); everything else records facts for the tests to assert.
Each rank writes ``<out>/<phase>_rank<r>.pt``. Phases:

    train       2k steps, DistLion and AdamW models side by side, save_state after step k, save_model
    resume      load_state(k) in a fresh launch (after trying a directory saved without distlion)
    accumulate  gradient accumulation over 4 micro-steps (bf16) against a summed-gradient reference
    fp16        GradScaler with an inf on rank 1 at one step
    load        load_state only (the tests launch it with the wrong number of processes)
    nodes       DistLion(ranks_per_node=--ranks-per-node): 2k steps with save_state after step k,
                then load_state(k) into the same objects and the last k steps again

Run by hand from the repository root, e.g.::

    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \
        tests/accelerate_job.py --phase train --out runs/accelerate_job
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from torch.utils.data import DataLoader, TensorDataset

import distlion.accelerate
from distlion import DistLion
from distlion.worker_exit import exit_worker

BATCH = 4
MICRO_STEPS = 4
INF_STEP, INF_RANK = 2, 1


class JsonLinesTracker(GeneralTracker):
    """Record what ``accelerator.log`` sends to the trackers, one JSON line per call."""

    name = "jsonlines"
    requires_logging_directory = False

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self.path

    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_loader(batches_per_rank: int, world_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(1234)
    n = batches_per_rank * BATCH * world_size
    x = torch.randn(n, 8, generator=generator)
    y = torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def same_on_all_ranks(accelerator: Accelerator, tensors) -> bool:
    """Return whether every rank holds bitwise the same tensors."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).unsqueeze(0)
    gathered = accelerator.gather(flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()]


def momentum(optimizer, model: torch.nn.Module) -> list[torch.Tensor]:
    inner = optimizer.optimizer  # AcceleratedOptimizer -> DistLion
    return [inner.state[p]["exp_avg"].clone() for p in model.parameters()]


def save(out: str, phase: str, accelerator: Accelerator, record: dict) -> None:
    torch.save(record, os.path.join(out, f"{phase}_rank{accelerator.process_index}.pt"))


def build_train_objects(accelerator: Accelerator, steps: int):
    """The DistLion model and an AdamW model, prepared in one call the way a script would."""
    model, model2 = make_model(0), make_model(1)
    optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.05 * s))
    loader = make_loader(steps, accelerator.num_processes)
    return distlion.accelerate.prepare(accelerator, model, optimizer, loader, scheduler, model2, adamw)


def run_train(args, accelerator: Accelerator) -> None:
    model, optimizer, loader, scheduler, model2, adamw = build_train_objects(accelerator, args.steps)
    record = {"numel": sum(p.numel() for p in model.parameters()), "world_size": accelerator.num_processes,
              "load_errors": [], "steps": []}
    start = 0
    if args.phase == "resume":
        try:
            accelerator.load_state(args.plain_ckpt)
        except ValueError as error:
            record["load_errors"].append(str(error))
        accelerator.load_state(args.ckpt)
        start = args.save_at
        loader = accelerator.skip_first_batches(loader, start)
    for step, (x, y) in enumerate(loader, start=start):
        accelerator.backward(F.mse_loss(model(x), y))
        accelerator.backward(F.mse_loss(model2(x), y))
        facts = {"grads_same": same_on_all_ranks(accelerator, grads(model)),
                 "adamw_grads_same": same_on_all_ranks(accelerator, grads(model2))}
        sent = optimizer.optimizer.comm_stats.bytes_sent
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        adamw.step()
        adamw.zero_grad()
        facts["bytes_sent"] = optimizer.optimizer.comm_stats.bytes_sent - sent
        facts["params_same"] = same_on_all_ranks(accelerator, model.parameters())
        facts["adamw_params_same"] = same_on_all_ranks(accelerator, model2.parameters())
        record["steps"].append(facts)
        accelerator.log(distlion.accelerate.comm_metrics(optimizer), step=step)
        if args.phase == "train" and step + 1 == args.save_at:
            accelerator.save_state(args.ckpt)
    if args.phase == "train":
        accelerator.save_model(model, os.path.join(args.out, "final_model"))
    record.update(params=[p.detach().clone() for p in model.parameters()], momentum=momentum(optimizer, model),
                  adamw_params=[p.detach().clone() for p in model2.parameters()],
                  comm=optimizer.optimizer.comm_stats.as_dict(), lr=scheduler.get_last_lr())
    save(args.out, args.phase, accelerator, record)


def run_accumulate(args, accelerator: Accelerator) -> None:
    """Accumulate 4 micro-steps; a reference DistLion steps once on the summed micro-gradients."""
    model = make_model(0)
    reference = copy.deepcopy(model)
    optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
    reference_opt = DistLion(reference.parameters(), lr=1e-2, weight_decay=0.1)
    loader = make_loader(args.steps * MICRO_STEPS, accelerator.num_processes)
    model, optimizer, loader = distlion.accelerate.prepare(accelerator, model, optimizer, loader)
    record = {"micro": [], "sync": []}
    summed = None
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            # Same forward as Accelerate's bf16 wrapper: autocast inside, fp32 outputs.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = reference(x)
            micro = torch.autograd.grad(F.mse_loss(out.float(), y) / MICRO_STEPS, list(reference.parameters()))
            summed = [g.clone() for g in micro] if summed is None else [s.add_(g) for s, g in zip(summed, micro)]
            facts = {"sync": accelerator.sync_gradients}
            if accelerator.sync_gradients:
                for p, g in zip(reference.parameters(), summed):
                    p.grad = g
                summed = None
                facts["grads_equal_reference"] = all(torch.equal(a, b) for a, b in
                                                     zip(grads(model), grads(reference)))
                facts["grads_same"] = same_on_all_ranks(accelerator, grads(model))
                facts["norm"] = float(accelerator.clip_grad_norm_(model.parameters(), 0.5))
                facts["reference_norm"] = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
                reference_opt.step()
                reference_opt.zero_grad()
            optimizer.step()
            optimizer.zero_grad()
            facts["votes"] = optimizer.optimizer.comm_stats.steps
            if accelerator.sync_gradients:
                facts["params_equal_reference"] = all(torch.equal(a, b) for a, b in
                                                      zip(model.parameters(), reference.parameters()))
                facts["momentum_equal_reference"] = all(
                    torch.equal(a, reference_opt.state[p]["exp_avg"])
                    for a, p in zip(momentum(optimizer, model), reference.parameters()))
                facts["params_same"] = same_on_all_ranks(accelerator, model.parameters())
            record["micro"].append(facts)
    save(args.out, args.phase, accelerator, record)


def run_fp16(args, accelerator: Accelerator) -> None:
    """Train under fp16 + GradScaler; rank INF_RANK gets an inf loss at step INF_STEP."""
    model = make_model(0)
    optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.05 * s))
    loader = make_loader(args.steps, accelerator.num_processes)
    model, optimizer, loader, scheduler = distlion.accelerate.prepare(accelerator, model, optimizer, loader,
                                                                      scheduler)
    record = {"steps": [], "scaler": type(accelerator.scaler).__name__}
    for step, (x, y) in enumerate(loader):
        loss = F.mse_loss(model(x), y)
        if step == INF_STEP and accelerator.process_index == INF_RANK:
            loss = loss * float("inf")
        accelerator.backward(loss)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        record["steps"].append({
            "skipped": optimizer.step_was_skipped,
            "changed": not all(torch.equal(a, b) for a, b in zip(before, model.parameters())),
            "scale": accelerator.scaler.get_scale(),
            "scale_same": same_on_all_ranks(accelerator, [torch.tensor(accelerator.scaler.get_scale())]),
            "lr_same": same_on_all_ranks(accelerator, [torch.tensor(scheduler.get_last_lr())]),
            "params_same": same_on_all_ranks(accelerator, model.parameters()),
            "params_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())})
    record["comm"] = optimizer.optimizer.comm_stats.as_dict()
    save(args.out, args.phase, accelerator, record)


def run_nodes(args, accelerator: Accelerator) -> None:
    """Train with nodes of ``--ranks-per-node`` ranks, save at k, then load k and train the last steps again."""
    model = make_model(0)
    optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1, ranks_per_node=args.ranks_per_node)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.05 * s))
    loader = make_loader(args.steps, accelerator.num_processes)
    model, optimizer, loader, scheduler = distlion.accelerate.prepare(accelerator, model, optimizer, loader,
                                                                      scheduler)
    inner = optimizer.optimizer
    record = {"ranks_per_node": inner.ranks_per_node, "state_numel": sum(
        t.numel() for state in inner.state.values() for t in state.values())}

    def train(batches, start: int) -> dict:
        run = {"params": [], "params_same": [], "grads_same": []}
        for step, (x, y) in enumerate(batches, start=start):
            accelerator.backward(F.mse_loss(model(x), y))
            run["grads_same"].append(same_on_all_ranks(accelerator, grads(model)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            run["params"].append([p.detach().clone() for p in model.parameters()])
            run["params_same"].append(same_on_all_ranks(accelerator, model.parameters()))
            if step + 1 == args.save_at and args.ckpt is not None:
                accelerator.save_state(args.ckpt)
        run.update(momentum=momentum(optimizer, model), comm=inner.comm_stats.as_dict(), lr=scheduler.get_last_lr())
        return run

    record["full"] = train(loader, 0)
    args.ckpt, ckpt = None, args.ckpt  # the second pass saves nothing
    accelerator.load_state(ckpt)
    record["resumed"] = train(accelerator.skip_first_batches(loader, args.save_at), args.save_at)
    save(args.out, args.phase, accelerator, record)


def run_load(args, accelerator: Accelerator) -> None:
    build_train_objects(accelerator, args.steps)
    accelerator.load_state(args.ckpt)
    save(args.out, args.phase, accelerator, {"loaded": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["train", "resume", "accumulate", "fp16", "load", "nodes"],
                        required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--save-at", type=int, default=4)
    parser.add_argument("--ckpt", help="directory for save_state / load_state")
    parser.add_argument("--plain-ckpt", help="a directory saved without distlion (resume tries it first)")
    parser.add_argument("--ranks-per-node", type=int, default=1, help="DistLion's ranks_per_node (phase nodes)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    accelerator = Accelerator(gradient_accumulation_steps=MICRO_STEPS if args.phase == "accumulate" else 1,
                              log_with=[JsonLinesTracker(os.path.join(args.out, f"{args.phase}_log.jsonl"))])
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.device.type == "cpu":
        # Accelerate builds its GradScaler only on GPUs. Build the one it builds there, on the CPU, so this
        # CPU job runs Accelerate's fp16 path (scaled backward, GradScaler.step/update, autocast fp16).
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        accelerator.native_amp = True
    accelerator.init_trackers("distlion-test")
    {"train": run_train, "resume": run_train, "accumulate": run_accumulate, "fp16": run_fp16,
     "load": run_load, "nodes": run_nodes}[args.phase](args, accelerator)
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_worker()
