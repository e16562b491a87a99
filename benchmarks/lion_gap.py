"""Where Lion's gap to AdamW on the demo task comes from: one process, one change per run.

Each variant trains the demo's byte-level GPT in one process (global batch 32 sequences,
the demo's 4 workers x 8, so no vote is involved: DistLion with one rank is plain Lion)
with ``launch.train``'s schedule, hyper-parameters and validation windows (``launch.recipe``), and changes
one thing: the lr multiple of one kind of parameter, a separate output layer instead of
the one tied to the token embedding, AdamW instead of Lion for one kind of parameter
(a hybrid: which parameters Lion handles worse), or the model's width. Parameter kinds:
``emb`` (token and position embeddings; the token one is also the output layer when
tied), ``head`` (the untied output layer), ``qkv``, ``proj`` (attention), ``fc``, ``out``
(MLP), ``vec`` (biases and LayerNorm gains, no weight decay). A kind's lr multiple
applies to whichever optimizer takes it: in ``lion_emb10_adamw_emb`` AdamW moves the
embeddings at 10x its own lr. ``lr`` multiplies Lion's lr for every kind, ``weight_decay``
replaces Lion's, and ``vote_ema_beta`` turns on DistLion's scaled step (with one rank the
vote is the local sign).
Prints the final validation loss of every variant and its gap to AdamW of the same
model; writes JSON with every curve::

    python -m benchmarks.lion_gap                         # every variant, seed 0, 2 at a time
    python -m benchmarks.lion_gap --variants adamw lion_emb10 --seeds 0 1 2
    python -m benchmarks.lion_gap --smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import threading
import time
from types import SimpleNamespace

import torch

from benchmarks import harness
from distlion import DistLion
from distlion.kernels.arithmetic import bias_correction
from launch.data import load_corpus, train_batch
from launch.model import GPT, GPTConfig
from launch.recipe import DEFAULT_HYPERPARAMETERS, Session, evaluate, lr_at

KINDS = ("emb", "head", "qkv", "proj", "fc", "out", "vec")
# What every variant starts from: launch.train's AdamW, and Lion as the study began (one lr, unscaled steps),
# so that a change of launch.train's DistLion defaults leaves the variants' meaning as it is.
SETTINGS = {"adamw": {k: DEFAULT_HYPERPARAMETERS["adamw"][k] for k in ("lr", "weight_decay", "betas")},
            "lion": {"lr": 1e-3, "weight_decay": 0.3, "betas": (0.9, 0.999)}}
DEMO_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
# name -> what differs from Lion with one lr for every parameter (or from AdamW)
VARIANTS = {
    "adamw": {"optimizer": "adamw"},
    "lion": {},
    "lion_emb10": {"lr_scale": {"emb": 10}},
    "adamw_untied": {"optimizer": "adamw", "tied_output": False},
    "lion_untied_emb10": {"tied_output": False, "lr_scale": {"emb": 10}},
    "lion_untied_emb30": {"tied_output": False, "lr_scale": {"emb": 30}},
    "lion_untied_emb30_head3": {"tied_output": False, "lr_scale": {"emb": 30, "head": 3}},
    "lion_emb10_proj_fc_out0.3": {"lr_scale": {"emb": 10, "proj": 0.3, "fc": 0.3, "out": 0.3}},
    "lion_emb10_proj_fc_out3": {"lr_scale": {"emb": 10, "proj": 3, "fc": 3, "out": 3}},
    "adamw_emb10": {"optimizer": "adamw", "lr_scale": {"emb": 10}},
    "lion_adamw_emb": {"adamw_kinds": ["emb"]},
    "lion_emb10_adamw_emb": {"lr_scale": {"emb": 10}, "adamw_kinds": ["emb"]},
    "lion_emb10_adamw_qkv": {"lr_scale": {"emb": 10}, "adamw_kinds": ["qkv"]},
    "lion_emb10_adamw_vec": {"lr_scale": {"emb": 10}, "adamw_kinds": ["vec"]},
    "lion_emb10_adamw_proj_fc_out": {"lr_scale": {"emb": 10}, "adamw_kinds": ["proj", "fc", "out"]},
    "adamw_width256": {"optimizer": "adamw", "n_embd": 256, "n_head": 8},
    "lion_emb10_width256": {"lr_scale": {"emb": 10}, "n_embd": 256, "n_head": 8},
    # the sign step's size does not shrink with width as AdamW's does: half the lr, the embeddings' kept
    "lion_lr0.5x_emb20_width256": {"lr_scale": {"emb": 20, "qkv": 0.5, "proj": 0.5, "fc": 0.5, "out": 0.5,
                                                "vec": 0.5}, "n_embd": 256, "n_head": 8},
    # the scaled step (DistLion's vote_ema_beta): smaller steps where the sign keeps flipping, so a larger lr
    "lion_emb10_vote_ema": {"lr_scale": {"emb": 10}, "vote_ema_beta": 0.9},
    "lion_lr4x_emb10_vote_ema": {"lr": 4, "lr_scale": {"emb": 10}, "vote_ema_beta": 0.9},
    "lion_lr6x_emb10_vote_ema": {"lr": 6, "lr_scale": {"emb": 10}, "vote_ema_beta": 0.9},
    "lion_lr10x_emb10_vote_ema": {"lr": 10, "lr_scale": {"emb": 10}, "vote_ema_beta": 0.9},
    "lion_lr6x_emb10_vote_ema_wd0.1": {"lr": 6, "lr_scale": {"emb": 10}, "vote_ema_beta": 0.9, "weight_decay": 0.1},
}
SMOKE_VARIANTS = ["adamw", "lion_untied_emb30_head3", "lion_emb10_adamw_proj_fc_out", "lion_lr6x_emb10_vote_ema"]


def parameter_kind(name: str, param: torch.Tensor) -> str:
    """The kind (see KINDS) of the GPT parameter called ``name``."""
    if name.startswith(("tok.", "pos.")):
        return "emb"
    if param.dim() < 2:
        return "vec"
    kind = name.split(".")[-2]  # blocks.0.attn.qkv.weight -> qkv; head.weight -> head
    if kind not in KINDS:
        raise ValueError(f"parameter {name!r} has no kind among {KINDS}")
    return kind


def build_optimizers(model: GPT, spec: dict) -> list[torch.optim.Optimizer]:
    """Lion (DistLion on one rank) and/or AdamW over the model's kinds, each group with its ``base_lr``."""
    main = spec.get("optimizer", "lion")
    scales = spec.get("lr_scale", {})
    by_kind: dict[str, list] = {}
    for name, param in model.named_parameters():
        by_kind.setdefault(parameter_kind(name, param), []).append(param)
    groups = {"lion": [], "adamw": []}
    for kind, params in by_kind.items():
        optimizer = "adamw" if kind in spec.get("adamw_kinds", ()) else main
        settings = SETTINGS[optimizer]
        lion_group = optimizer == "lion"
        base_lr = settings["lr"] * (spec.get("lr", 1.0) if lion_group else 1.0)
        decay = spec.get("weight_decay", settings["weight_decay"]) if lion_group else settings["weight_decay"]
        groups[optimizer].append({"params": params, "weight_decay": 0.0 if kind == "vec" else decay,
                                  "base_lr": base_lr * scales.get(kind, 1.0)})
    optimizers = []
    if groups["lion"]:
        lion = SETTINGS["lion"]
        optimizers.append(DistLion(groups["lion"], lr=lion["lr"], betas=lion["betas"],
                                   vote_ema_beta=spec.get("vote_ema_beta")))
    if groups["adamw"]:
        adamw = SETTINGS["adamw"]
        optimizers.append(torch.optim.AdamW(groups["adamw"], lr=adamw["lr"], betas=adamw["betas"]))
    return optimizers


def train_variant(name: str, spec: dict, seed: int, steps: int, batch_size: int, eval_interval: int,
                  shape: dict, eval_sequences: int, threads: int) -> dict:
    """Train one variant in this process; return its settings, curve and final validation loss."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = GPTConfig(**{**shape, **{k: spec[k] for k in ("n_embd", "n_head", "tied_output") if k in spec}})
    model = GPT(config)
    optimizers = build_optimizers(model, spec)
    corpus = load_corpus(None)
    # launch.train's schedule (warm-up 10% of the steps, cosine to 10%) as a factor of each group's base lr
    schedule = SimpleNamespace(lr=1.0, steps=steps, warmup_steps=max(1, steps // 10), min_lr_ratio=0.1)
    scoring = SimpleNamespace(eval_sequences=eval_sequences, batch_size=batch_size, block_size=config.block_size)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_at(step, schedule)
        x, y = train_batch(corpus, step=step, rank=0, world_size=1, batch_size=batch_size,
                           block_size=config.block_size, seed=seed)
        _, loss = model(x, y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if (step + 1) % eval_interval == 0 or step + 1 == steps:
            curve.append((step + 1, round(evaluate(model, corpus, scoring, Session()), 4)))
    return {"variant": name, "seed": seed, "spec": spec, "num_parameters": config.num_parameters,
            "n_embd": config.n_embd, "steps": steps, "batch_size": batch_size, "final_val_loss": curve[-1][1],
            "val_loss_curve": curve, "mean_step_scale": mean_step_scale(optimizers, steps),
            "seconds": round(time.perf_counter() - start, 1)}


def mean_step_scale(optimizers: list[torch.optim.Optimizer], steps: int) -> float | None:
    """The scaled step's mean size in units of lr after the last step: the mean of (bias-corrected EMA)^2."""
    total, count = 0.0, 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            beta = group.get("vote_ema_beta")
            for param in group["params"] if beta is not None else ():
                unbiased = optimizer.state[param]["vote_ema"] * bias_correction(beta, steps)
                total, count = total + float((unbiased * unbiased).sum()), count + unbiased.numel()
    return round(total / count, 4) if count else None


def exit_with_parent(parent_pid: int) -> None:
    """Run in each worker: end it when the parent dies (a SIGTERM to the parent would orphan it)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def baseline_of(name: str) -> str:
    """The plain AdamW variant of the same model (width and output layer)."""
    def model_of(spec: dict) -> tuple:
        return spec.get("n_embd"), spec.get("tied_output", True)
    return next(other for other, spec in VARIANTS.items() if spec.get("optimizer") == "adamw"
                and not spec.get("lr_scale") and model_of(spec) == model_of(VARIANTS[name]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", choices=list(VARIANTS), nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=harness.positive_int, default=300)
    parser.add_argument("--batch_size", type=harness.positive_int, default=32, help="sequences per step")
    parser.add_argument("--jobs", type=harness.positive_int, default=2, help="runs at a time, one process each")
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    shape, eval_sequences, eval_interval = DEMO_SHAPE, 256, 50
    if args.smoke:
        args.variants, args.seeds, args.steps, args.batch_size, args.jobs = SMOKE_VARIANTS, [0], 4, 4, 1
        shape, eval_sequences, eval_interval = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}, 8, 2
    runs = [(name, seed) for seed in args.seeds for name in args.variants]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    results, start = [], time.perf_counter()
    print(f"{len(runs)} runs, {args.jobs} at a time, {args.steps} steps of {args.batch_size} sequences each")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(train_variant, name, VARIANTS[name], seed, args.steps, args.batch_size, eval_interval,
                               shape, eval_sequences, threads): (name, seed) for name, seed in runs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            result = future.result()
            results.append(result)
            print(f"[{done}/{len(runs)}] {result['variant']} seed {result['seed']}: final val loss "
                  f"{result['final_val_loss']:.4f} ({result['seconds']:.0f} s)", flush=True)
    finals = {(r["variant"], r["seed"]): r["final_val_loss"] for r in results}
    print(f"\nFinal validation loss (nats/byte), one process, {args.steps} steps, batch {args.batch_size}")
    for name, seed in runs:
        base = finals.get((baseline_of(name), seed))
        gap = f"{100 * (finals[name, seed] / base - 1):+6.1f}% vs {baseline_of(name)}" if base else ""
        print(f"  {name:30s} seed {seed}  {finals[name, seed]:.4f}  {gap}")
    payload = {"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds, "shape": shape,
               "hyperparameters": SETTINGS,
               "wall_seconds": round(time.perf_counter() - start, 1),
               "runs": sorted(results, key=lambda r: (r["seed"], runs.index((r["variant"], r["seed"]))))}
    harness.write_results("lion_gap_variants", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
