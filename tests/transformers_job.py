"""A stock Hugging Face Trainer script with DistLion, launched by tests/test_transformers.py.

It trains a tiny GPT-2 (built from a config, nothing downloaded) on an in-memory dataset
on 2 CPU processes (gloo) with bf16, gradient accumulation, clipping, a cosine LR schedule
with warm-up and ``save_steps``. It differs from an AdamW script in the two lines the
README shows (``DistLionTrainer`` and ``optimizers=(DistLion(...), None)``); the
``Recorder`` callback records facts for the tests. Each rank writes
``<out>/<phase>_rank<r>.pt``. Phases:

    train   STEPS optimizer steps from scratch, a checkpoint every SAVE_AT steps; then
            2 steps of a Trainer that builds DistLion itself (optimizer_cls_and_kwargs),
            and 2 steps with AdamW (DistLionTrainer is then Trainer)
    resume  resume_from_checkpoint from checkpoints that must fail (--bad-ckpt, each on
            every rank), then from --ckpt (checkpoint-SAVE_AT of a train run) to STEPS
    deepspeed  Trainer(deepspeed=config), fp32, ZeRO stage 1: DistLion named in the config, then
            given as optimizers=(DistLion(...), None); each trains to STEPS and resumes from
            checkpoint-SAVE_AT in a fresh Trainer

Run by hand from the repository root, e.g.::

    torchrun --standalone --nproc_per_node 2 tests/transformers_job.py --phase train --out runs/tj
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 \
        tests/transformers_job.py --phase resume --out runs/tj --ckpt runs/tj/train_run/checkpoint-4
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

from distlion import DistLion, unwrap  # noqa: E402
from distlion.transformers import DistLionTrainer  # noqa: E402
from distlion.worker_exit import exit_worker  # noqa: E402
from rank_checks import run_job_phase  # noqa: E402

STEPS, SAVE_AT = 8, 4          # optimizer steps; a checkpoint every SAVE_AT steps
ACCUMULATE = 2                 # gradient_accumulation_steps
BATCH = 4                      # per_device_train_batch_size
SAMPLES, SEQ = 96, 16          # 6 optimizer steps per epoch on 2 ranks: resume mid-epoch, train into epoch 2
MAX_GRAD_NORM = 0.25
LR = 3e-3


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_dataset() -> list[dict]:
    """Counting sequences (token i+1 = token i + 1 mod 64) from random starts: quickly learnable."""
    generator = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, 64, (SAMPLES, 1), generator=generator)
    ids = (starts + torch.arange(SEQ)) % 64
    return [{"input_ids": row, "labels": row} for row in ids]


def make_args(output_dir: str, **overrides) -> TrainingArguments:
    settings = dict(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=BATCH,
                    gradient_accumulation_steps=ACCUMULATE, learning_rate=LR, lr_scheduler_type="cosine",
                    warmup_steps=2, max_grad_norm=MAX_GRAD_NORM, bf16=True, use_cpu=True, save_strategy="steps",
                    save_steps=SAVE_AT, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **overrides})


def same_on_all_ranks(tensors) -> bool:
    """Return whether every rank holds bitwise the same tensors."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


class Recorder(TrainerCallback):
    """Facts per optimizer step: gradients as DistLion gets them (after clipping), parameters after the step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.micro_votes: list[int] = []  # DistLion's step count after every micro-step but the last of a step
        self.pending: dict = {}

    def on_substep_end(self, args, state, control, optimizer=None, **kwargs):
        self.micro_votes.append(unwrap(optimizer).comm_stats.steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        self.pending = {"grads_same": same_on_all_ranks(grads),
                        "clipped_norm": torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                              for g in grads])).item()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        facts = {**self.pending, "step": state.global_step, "lr": optimizer.param_groups[0]["lr"],
                 "params_same": same_on_all_ranks(list(model.parameters()))}
        inner = unwrap(optimizer)  # DistLion inside Accelerate's wrapper; None for AdamW
        if inner is not None:
            facts.update(bytes_sent=inner.comm_stats.bytes_sent, votes=inner.comm_stats.steps)
        self.steps.append(facts)


def final_facts(trainer: DistLionTrainer, recorder: Recorder) -> dict:
    optimizer = trainer.distlion_optimizer()
    params = list(trainer.model.parameters())
    return {"params": [p.detach().clone() for p in params],
            "momentum": [optimizer.state[p]["exp_avg"].clone() for p in params],
            "log_history": trainer.state.log_history, "steps": recorder.steps, "micro_votes": recorder.micro_votes,
            "comm": optimizer.comm_stats.as_dict(), "numel": sum(p.numel() for p in params),
            "model_type": type(trainer.model_wrapped).__name__, "mixed_precision": trainer.accelerator.mixed_precision}


def build(output_dir: str, **overrides) -> tuple[DistLionTrainer, Recorder]:
    args = make_args(output_dir, **overrides)  # starts torch.distributed: before DistLion
    model = make_model()
    optimizer = DistLion(model.parameters(), lr=LR, weight_decay=0.1)
    recorder = Recorder()
    trainer = DistLionTrainer(model=model, args=args, train_dataset=make_dataset(), optimizers=(optimizer, None),
                              callbacks=[recorder])
    return trainer, recorder


def train_phase(out: str) -> dict:
    trainer, recorder = build(os.path.join(out, "train_run"))
    trainer.train()
    result = final_facts(trainer, recorder)
    del trainer
    gc.collect()

    # DistLion built by Trainer itself: Trainer's two param groups (weight decay and none).
    args = make_args(os.path.join(out, "cls_run"), max_steps=2, gradient_accumulation_steps=1, save_strategy="no",
                     weight_decay=0.1)
    recorder = Recorder()
    trainer = DistLionTrainer(model=make_model(), args=args, train_dataset=make_dataset(), callbacks=[recorder],
                              optimizer_cls_and_kwargs=(DistLion, {"lr": LR, "betas": (0.9, 0.99)}))
    trainer.train()
    optimizer = trainer.distlion_optimizer()
    result["cls_run"] = {"is_distlion": isinstance(optimizer, DistLion), "steps": recorder.steps,
                         "weight_decays": [group["weight_decay"] for group in optimizer.param_groups],
                         "model_type": type(trainer.model_wrapped).__name__}
    del trainer
    gc.collect()

    # Any other optimizer: DistLionTrainer is Trainer (DDP all-reduces, rank 0 writes optimizer.pt).
    args = make_args(os.path.join(out, "adamw_run"), max_steps=2, gradient_accumulation_steps=1, save_steps=2)
    model = make_model()
    recorder = Recorder()
    trainer = DistLionTrainer(model=model, args=args, train_dataset=make_dataset(), callbacks=[recorder],
                              optimizers=(torch.optim.AdamW(model.parameters(), lr=LR), None))
    trainer.train()
    result["adamw_run"] = {"steps": recorder.steps, "distlion": trainer.distlion_optimizer()}
    return result


def resume_phase(out: str, ckpt: str, bad_ckpts: list[str]) -> dict:
    errors = {}
    for bad in bad_ckpts:
        trainer, _ = build(os.path.join(out, "bad_run"))
        try:
            trainer.train(resume_from_checkpoint=bad)
        except Exception as error:  # every rank must raise, none may hang
            errors[os.path.basename(bad)] = f"{type(error).__name__}: {error}"
        del trainer
        gc.collect()
    trainer, recorder = build(os.path.join(out, "resume_run"), save_strategy="no")
    trainer.train(resume_from_checkpoint=ckpt)
    return {**final_facts(trainer, recorder), "errors": errors}


DEEPSPEED_CONFIGS = {  # deepspeed=: DistLion named in the config, or given as optimizers=(DistLion(...), None)
    "entry": {"optimizer": {"type": "DistLion", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}}},
    "client": {},
}


def deepspeed_phase(out: str) -> dict:
    """Trainer(deepspeed=...) both ways in: train to STEPS, then resume from checkpoint-SAVE_AT in a fresh Trainer."""
    result = {}
    grads_same: list[bool] = []  # per DistLion step: were the gradients it votes on equal on every rank?

    def record_gradients(optimizer, args, kwargs) -> None:  # the engine steps inside Trainer's backward
        if isinstance(optimizer, DistLion):
            grads_same.append(same_on_all_ranks([p.grad for group in optimizer.param_groups
                                                 for p in group["params"] if p.grad is not None]))

    register_optimizer_step_pre_hook(record_gradients)
    # Without a GPU, Trainer's DeepSpeed setup names no backend and Accelerate counts 1 process (every rank would
    # get the same batches): set the state up with gloo first, and have Trainer use it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    for way_in, optimizer_entry in DEEPSPEED_CONFIGS.items():
        config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 1},
                  **optimizer_entry}
        runs = {}
        for run, resume in (("train", None), ("resume", os.path.join(out, f"ds_{way_in}_train", f"checkpoint-{SAVE_AT}"))):
            AcceleratorState._reset_state()  # keeps the PartialState: a fresh Trainer may set up its DeepSpeed plugin
            args = make_args(os.path.join(out, f"ds_{way_in}_{run}"), deepspeed=config, use_cpu=False, bf16=False,
                             accelerator_config={"use_configured_state": True}, weight_decay=0.1, save_strategy="steps" if resume is None else "no")
            model = make_model()
            optimizers = (None, None)
            if way_in == "client":
                optimizers = (DistLion(model.parameters(), lr=LR, weight_decay=0.1), None)
            recorder = Recorder()
            trainer = DistLionTrainer(model=model, args=args, train_dataset=make_dataset(), optimizers=optimizers,
                                      callbacks=[recorder])
            grads_same.clear()
            trainer.train(resume_from_checkpoint=resume)
            optimizer = trainer.distlion_optimizer()
            runs[run] = {"steps": recorder.steps, "grads_same": list(grads_same), "params": [p.detach().clone() for p in trainer.model.parameters()],
                         "comm": optimizer.comm_stats.as_dict(), "allreduce": trainer.model_wrapped.enable_backward_allreduce,
                         "numel": sum(p.numel() for p in trainer.model.parameters()),
                         "log_history": trainer.state.log_history}
            if resume is None:
                runs["saved"] = sorted(os.listdir(os.path.join(out, f"ds_{way_in}_train", f"checkpoint-{SAVE_AT}",
                                                              f"global_step{SAVE_AT}")))
            del trainer
            gc.collect()
        result[way_in] = runs
    return result


if __name__ == "__main__":
    run_job_phase({"train": lambda options: train_phase(options.out),
                   "resume": lambda options: resume_phase(options.out, options.ckpt, options.bad_ckpt),
                   "deepspeed": lambda options: deepspeed_phase(options.out)})
    exit_worker()
