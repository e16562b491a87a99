"""launch.train end to end: torchrun with 2 gloo ranks and single process, at a tiny size.

Checks what the run reports, not how fast: the loss went down, DistLion kept every
rank's parameters bit-identical without DDP, its measured bytes are a small fraction of
DDP's, and the command line rejects bad input with a message naming it.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from launch import recipe, train
from launch.data import TrainWindows, load_corpus, train_batch
from launch.recipe import SMOKE_ARGS, run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [*SMOKE_ARGS, "--no_progress", "--steps", "16", "--eval_interval", "8"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return {name: run_training(["--optimizer", name, *TINY], 2, str(out / name))
            for name in ("distlion", "adamw", "lion")}


def _check_run(metrics: dict, world_size: int) -> None:
    history = metrics["history"]
    assert metrics["world_size"] == world_size
    assert [h["step"] for h in history] == [0, 8, 16]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.05, history  # it learned something
    assert metrics["final_val_loss"] == history[-1]["val_loss"]
    assert metrics["parameters_identical"], metrics["parameter_digests"]
    assert len(metrics["parameter_digests"]) == world_size
    assert metrics["step_time_s"] > 0 and metrics["wall_time_s"] > 0


@pytest.mark.scripts
@pytest.mark.timeout(240)
def test_torchrun_two_ranks_distlion_vs_adamw(two_rank_runs):
    lion, adamw = two_rank_runs["distlion"], two_rank_runs["adamw"]
    for metrics in (lion, adamw):
        _check_run(metrics, world_size=2)
    assert lion["exchange"] == "all_gather"  # auto with 2 ranks
    # DistLion's bytes are its own counters; DDP's come from the counting comm hook.
    assert lion["bytes_sent_per_step"] == lion["comm_stats"]["bytes_sent_per_step"]
    assert adamw["bytes_sent_per_step"] == adamw["fp32_allreduce_bytes_per_step"]  # every parameter, fp32
    assert 0 < lion["bytes_sent_per_step"] < adamw["bytes_sent_per_step"] / 20
    # Same seed: same initial weights and data, hence the same starting loss.
    assert lion["history"][0]["val_loss"] == adamw["history"][0]["val_loss"]


@pytest.mark.scripts
@pytest.mark.timeout(240)
def test_torchrun_two_ranks_global_lion(two_rank_runs):
    lion, adamw = two_rank_runs["lion"], two_rank_runs["adamw"]
    _check_run(lion, world_size=2)
    assert lion["bytes_sent_per_step"] == adamw["bytes_sent_per_step"]  # DDP's all-reduce, then plain Lion
    assert lion["comm_stats"]["bytes_sent"] == 0  # the Lion step itself exchanges nothing


@pytest.mark.scripts
@pytest.mark.timeout(300)
def test_torchrun_fsdp_two_nodes_of_two(tmp_path):
    """--fsdp on 4 ranks as 2 x 2: DistLion over FSDP2 against FSDP2's hybrid sharding with AdamW."""
    runs = {name: run_training(["--optimizer", name, "--fsdp", "--ranks_per_node", "2", *TINY], 4,
                               str(tmp_path / name)) for name in ("distlion", "adamw")}
    for metrics in runs.values():
        _check_run(metrics, world_size=4)  # full parameters identical on all 4 ranks
        assert metrics["fsdp"]
    lion = runs["distlion"]
    assert lion["comm_stats"]["ranks_per_node"] == 1  # FSDP reduced the gradient inside the node
    # each rank votes on its half of the parameters: a quarter of the flat 4-rank vote's bits, per rank
    numel = lion["num_parameters"]
    assert numel / 8 / 2 <= lion["comm_stats"]["inter_node_bytes_sent"] / lion["comm_stats"]["steps"] < numel / 8
    assert lion["history"][0]["val_loss"] == runs["adamw"]["history"][0]["val_loss"]


@pytest.mark.scripts
@pytest.mark.timeout(240)
def test_accelerate_launch_matches_torchrun(two_rank_runs, tmp_path):
    """Under `accelerate launch` (distlion.accelerate.prepare, a sharded DataLoader) DistLion
    trains bit for bit as under torchrun: same batches per rank, no DDP all-reduce."""
    pytest.importorskip("accelerate")
    pytest.importorskip("distlion.accelerate")
    out = tmp_path / "accelerate"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "0", "-m", "launch.train", "--accelerate",
               "--optimizer", "distlion", *TINY, "--out", str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=230, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["launcher"] == "accelerate"
    _check_run(metrics, world_size=2)
    torchrun = two_rank_runs["distlion"]
    assert metrics["parameter_digests"] == torchrun["parameter_digests"]
    assert metrics["bytes_sent"] == torchrun["bytes_sent"]


@pytest.mark.scripts
@pytest.mark.timeout(120)
def test_single_process(tmp_path):
    out = tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "launch.train", "--optimizer", "distlion", *TINY, "--out", str(out)],
                            capture_output=True, text=True, timeout=110, cwd=REPO)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    _check_run(metrics, world_size=1)
    assert metrics["bytes_sent"] == 0
    assert "final val loss" in result.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: 0 is not a positive integer"),
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd=30 is not a multiple of n_head=4"),
    (["--lr", "-1"], "argument --lr: -1 is not a non-negative number"),
    (["--betas", "0.9", "1.0"], "--betas 0.9 1.0: each must be in [0, 1)"),
    (["--data", "/nonexistent/corpus.txt"], "--data '/nonexistent/corpus.txt': no such file"),
    (["--warmup_steps", "50", "--steps", "10"], "--warmup_steps 50"),
    (["--accelerate", "--deepspeed_config", "x.json"], "not allowed with argument"),
    (["--vote_ema_beta", "1.5"], "argument --vote_ema_beta: 1.5 is not in [0, 1) (or 'off')"),
    (["--optimizer", "adamw", "--vote_ema_beta", "0.9"], "--vote_ema_beta 0.9: only distlion and lion take it"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_defaults_follow_lion_guidance():
    adamw, lion = train.parse_args(["--optimizer", "adamw"]), train.parse_args(["--optimizer", "distlion"])
    # the scaled step moves noisy coordinates by ~5% of the lr, so its lr is above AdamW's
    assert lion.vote_ema_beta == 0.9 and 1 < round(lion.lr / adamw.lr, 6) <= 3
    assert 3 <= round(lion.weight_decay / adamw.weight_decay, 6) <= 10
    # 'off' builds DistLion with Lion's unscaled step
    unscaled = train.parse_args(["--optimizer", "distlion", "--vote_ema_beta", "off"])
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert train.build_optimizer(unscaled, [{"params": params}], recipe.Session()).param_groups[0]["vote_ema_beta"] \
        is None
    assert train.build_optimizer(lion, [{"params": params}], recipe.Session()).param_groups[0]["vote_ema_beta"] == 0.9
    explicit = train.parse_args(["--optimizer", "distlion", "--lr", "1e-3", "--weight_decay", "0.5"])
    assert (explicit.lr, explicit.weight_decay) == (1e-3, 0.5)


@pytest.mark.timeout(30)
def test_lr_schedule_warms_up_then_decays():
    args = train.parse_args(["--steps", "100", "--warmup_steps", "10", "--lr", "1.0", "--min_lr_ratio", "0.1"])
    lrs = [recipe.lr_at(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.timeout(60)
def test_sharded_loader_gives_every_rank_its_train_batch():
    """Accelerate's round-robin sharding of TrainWindows yields exactly train_batch(step, rank)."""
    corpus = load_corpus(None)
    world_size, batch_size, block_size, steps = 3, 4, 16, 2
    windows = TrainWindows(corpus, steps=steps, world_size=world_size, batch_size=batch_size, block_size=block_size,
                           seed=7)
    batches = list(torch.utils.data.DataLoader(windows, batch_size=batch_size))
    for step in range(steps):
        for rank in range(world_size):
            x, y = train_batch(corpus, step=step, rank=rank, world_size=world_size, batch_size=batch_size,
                               block_size=block_size, seed=7)
            assert torch.equal(batches[step * world_size + rank][0], x)
            assert torch.equal(batches[step * world_size + rank][1], y)
            assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.timeout(60)
def test_corpus_split_is_deterministic_and_user_file_works(tmp_path):
    first, second = load_corpus(None), load_corpus(None)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.train.numel() > 1_000_000 and 0.03 < first.val.numel() / first.train.numel() < 0.3
    text = tmp_path / "text.txt"
    text.write_bytes(b"abcdefghij" * 100)
    user = load_corpus(str(text))
    assert (user.train.numel(), user.val.numel()) == (900, 100)


EXIT_WORKER_SCRIPT = """
import sys, torch.distributed as dist
from distlion.worker_exit import exit_worker
dist.init_process_group("gloo", init_method="file://" + {init!r}, rank=0, world_size=1)
print("written before the exit", end="")  # no newline: still buffered when exit_worker runs
sys.stderr.write("and on stderr")
exit_worker(3)
print("never reached")
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_exit_worker_flushes_and_keeps_the_exit_status(tmp_path):
    """exit_worker skips the interpreter teardown, so it must flush what was printed itself."""
    script = EXIT_WORKER_SCRIPT.format(init=str(tmp_path / "rendezvous"))
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, env=buffered)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "written before the exit"
    assert result.stderr.endswith("and on stderr")


def test_embedding_lr_scale_groups():
    """--embedding_lr_scale puts the embeddings (tied output layer included) in a group of their own."""
    from launch.model import GPT, GPTConfig

    model = GPT(GPTConfig(1, 2, 32, 16))
    assert [g["lr_scale"] for g in model.param_groups(0.3)] == [1.0, 1.0]  # unchanged layout by default
    groups = model.param_groups(0.3, embedding_lr_scale=10.0)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.3), (10.0, 0.3), (1.0, 0.0)]
    assert groups[1]["params"] == [model.tok.weight, model.pos.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
