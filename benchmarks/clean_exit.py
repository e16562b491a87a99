"""Exit status of finished DistLion jobs: N launches under real launchers, no exit_worker(), exit codes counted.

Each launch runs 2 gloo CPU processes that train a small model with DistLion for a few
steps and return from the script normally: no ``exit_worker()``, no
``destroy_process_group()``. A finished job must exit 0; a worker that dies in the
interpreter's teardown shows as "terminate called without an active exception", exit -6.

The abort needs one of gloo's worker threads to be the last owner of a finished work and
to reach the GIL after the interpreter began to shut down (distlion/comm/flat.py's
docstring). Unloaded, that is a rare race (about 1 launch in 100 on 2 cores). ``--amplify``
makes it likely: it preloads a small shim (built with the C compiler) that makes gloo's
worker threads, and only them, sleep before each mutex lock and before taking the GIL, as if
the scheduler had preempted them there. ``--unfixed`` runs the workers with the library's
handle retention turned off (what ``wait_for`` did before), as the control.

    python -m benchmarks.clean_exit                                 # 20 launches per launcher
    python -m benchmarks.clean_exit --amplify --variants fixed unfixed --launches 5
    python -m benchmarks.clean_exit --launchers lightning --tag lightning   # Lightning's own launcher
    python -m benchmarks.clean_exit --smoke                         # 1 amplified launch, torchrun
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
STEPS = 5
LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "lightning")
ABORT_MARK = "terminate called without an active exception"

SHIM_SOURCE = r"""
/* gloo's worker threads (named pt_gloo_*) sleep SHIM_LOCK_US before each mutex lock and SHIM_GIL_MS before
   taking the GIL; every other thread runs as usual. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
static __thread int gloo = -1;
static int is_gloo(void) {
  if (gloo < 0) {
    char name[17] = {0};
    prctl(PR_GET_NAME, name);
    if (strncmp(name, "pt_gloo", 7) == 0) gloo = 1;
    else if (strcmp(name, "python") != 0) gloo = 0;  /* "python": not named yet, ask again */
  }
  return gloo == 1;
}
static int env_int(const char* name) { const char* v = getenv(name); return v ? atoi(v) : 0; }
void PyEval_AcquireThread(void* tstate) {
  static void (*real)(void*) = 0;
  if (!real) real = (void (*)(void*))dlsym(RTLD_NEXT, "PyEval_AcquireThread");
  if (is_gloo()) usleep(env_int("SHIM_GIL_MS") * 1000);
  real(tstate);
}
int pthread_mutex_lock(pthread_mutex_t* mutex) {
  static int (*real)(pthread_mutex_t*) = 0;
  static int lock_us = -1;
  if (!real) real = (int (*)(pthread_mutex_t*))dlsym(RTLD_NEXT, "pthread_mutex_lock");
  if (lock_us < 0) lock_us = env_int("SHIM_LOCK_US");
  if (lock_us && is_gloo()) usleep(lock_us);
  return real(mutex);
}
"""
# 2 ms before each lock: gloo's thread lets go of a finished work well after the caller's thread has;
# 20 ms (a scheduler time slice) before the GIL. Unfixed, every launch aborts.
SHIM_ENV = {"SHIM_LOCK_US": "2000", "SHIM_GIL_MS": "20"}


# ------------------------------------------------------------------------------ worker

def worker(args) -> None:
    """Train a few steps with DistLion under the launcher's environment, then return normally."""
    import torch
    import torch.nn.functional as F

    import distlion.comm.flat as flat
    from distlion import DistLion

    if args.unfixed:  # the control: handles dropped right after their wait, no exit hook
        flat._finished = collections.deque(maxlen=0)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))  # Lightning's rank 1: LOCAL_RANK
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    batches = [(torch.randn(4, 8, generator=data), torch.randn(4, 1, generator=data)) for _ in range(STEPS)]
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "timeout": args.timeout}
    if args.launcher == "accelerate":
        from accelerate import Accelerator

        import distlion.accelerate
        accelerator = Accelerator()
        optimizer = DistLion(model.parameters(), **kwargs)
        model, optimizer = distlion.accelerate.prepare(accelerator, model, optimizer)
        for x, y in batches:
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        accelerator.end_training()
    elif args.launcher == "deepspeed":
        import deepspeed

        from distlion.deepspeed import initialize
        deepspeed.init_distributed(dist_backend="gloo")
        config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
                  "optimizer": {"type": "DistLion", "params": kwargs}}
        engine, _, _, _ = initialize(model=model, model_parameters=model.parameters(), config=config)
        for x, y in batches:
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
    elif args.launcher == "lightning":  # Lightning's own launcher starts rank 1 (this module again)
        train_with_lightning(model, batches, kwargs)
        return
    else:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        optimizer = DistLion(model.parameters(), **kwargs)
        for x, y in batches:
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    print(f"rank {rank}: trained {STEPS} steps", flush=True)


def train_with_lightning(model, batches: list, kwargs: dict) -> None:
    """``Trainer(strategy="distlion")`` on 2 CPU processes, STEPS steps on each rank's own batches."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import distlion.lightning  # noqa: F401  registers strategy="distlion"
    from distlion import DistLion

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, index):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return DistLion(self.parameters(), **kwargs)

    trainer = pl.Trainer(strategy="distlion", accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)  # the batches are this rank's already
    trainer.fit(Regression(), train_dataloaders=DataLoader(batches, batch_size=None))
    print(f"rank {trainer.global_rank}: trained {STEPS} steps", flush=True)


# ------------------------------------------------------------------------ orchestration

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_shim(directory: str) -> str | None:
    """Compile the amplifying shim into ``directory``; None when no C compiler is found."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = os.path.join(directory, "gloo_delay.c"), os.path.join(directory, "gloo_delay.so")
    with open(source, "w") as f:
        f.write(SHIM_SOURCE)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source, "-ldl"], check=True,
                   capture_output=True)
    return library


def command(launcher: str, worker_args: list[str]) -> list[str]:
    """The launch command (this interpreter's environment) running ``-m benchmarks.clean_exit --worker``."""
    bin_dir = os.path.dirname(sys.executable)
    module = ["benchmarks.clean_exit", "--worker", "--launcher", launcher, *worker_args]
    port = str(free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_port", port,
                "-m", *module]
    if launcher == "accelerate":
        return [os.path.join(bin_dir, "accelerate"), "launch", "--multi_gpu", "--num_machines", "1",
                "--num_processes", str(WORLD), "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", port, "-m", *module]
    if launcher == "deepspeed":
        return [os.path.join(bin_dir, "deepspeed"), "--num_gpus", str(WORLD), "--master_port", port,
                "--no_local_rank", "--module", *module]
    if launcher == "lightning":  # a plain process; Lightning starts the others
        return [sys.executable, "-m", *module]
    raise ValueError(f"unknown launcher {launcher!r}; use one of {LAUNCHERS}")


def launch(launcher: str, *, shim: str | None = None, unfixed: bool = False, timeout_s: float | None = None,
           limit: float = 240) -> dict:
    """Run one job to its end; return its exit code, whether a worker aborted, and the output's tail.

    The job runs in a session of its own: past ``limit`` seconds the launcher and its workers are killed
    and the result says ``hung``.
    """
    worker_args = (["--unfixed"] if unfixed else []) + ([] if timeout_s is None else ["--timeout", str(timeout_s)])
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu",
               "HF_HOME": home, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        if shim is not None:
            env.update(SHIM_ENV, LD_PRELOAD=" ".join(filter(None, [shim, os.environ.get("LD_PRELOAD")])))
        start = time.monotonic()
        process = subprocess.Popen(command(launcher, worker_args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, hung = process.communicate(timeout=limit)[0], False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, hung = process.communicate()[0], True
    return {"launcher": launcher, "returncode": process.returncode, "hung": hung,
            "aborted": ABORT_MARK in output or "SIGABRT" in output, "trained": output.count("trained") >= WORLD,
            "seconds": round(time.monotonic() - start, 1), "tail": output[-4000:]}


def study(launchers, variants, launches: int, shim: str | None, timeout_s: float | None) -> list[dict]:
    rows = []
    for variant in variants:
        for launcher in launchers:
            counts, aborted, hung, seconds = collections.Counter(), 0, 0, 0.0
            for i in range(launches):
                result = launch(launcher, shim=shim, unfixed=variant == "unfixed", timeout_s=timeout_s)
                counts[str(result["returncode"])] += 1
                aborted += result["aborted"]
                hung += result["hung"]
                seconds += result["seconds"]
                if result["returncode"] != 0 and not result["aborted"]:
                    print(f"  {launcher} launch {i}: exit {result['returncode']} without an abort:\n"
                          f"{result['tail'][-1500:]}", flush=True)
            row = {"variant": variant, "launcher": launcher, "launches": launches, "exit_codes": dict(counts),
                   "aborted": aborted, "hung": hung, "mean_launch_s": round(seconds / launches, 1)}
            rows.append(row)
            print(f"{variant:8s} {launcher:10s} {launches:3d} launches: exit codes {dict(sorted(counts.items()))}, "
                  f"aborted {aborted}, hung {hung}, {row['mean_launch_s']} s/launch", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=20, help="launches per launcher and variant")
    parser.add_argument("--launchers", nargs="+", choices=LAUNCHERS, default=["torchrun", "accelerate"])
    parser.add_argument("--variants", nargs="+", choices=["fixed", "unfixed"], default=["fixed"])
    parser.add_argument("--amplify", action="store_true", help="preload the shim that widens the race")
    parser.add_argument("--timeout", type=float, default=None, help="DistLion(timeout=...) in the workers")
    parser.add_argument("--smoke", action="store_true", help="1 amplified torchrun launch: checks that it runs")
    parser.add_argument("--out", default=None, metavar="DIR", help="results directory (default benchmarks/results)")
    parser.add_argument("--tag", default=None, help="results file clean_exit-TAG-DATE.json, for a non-default run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help=argparse.SUPPRESS)
    parser.add_argument("--unfixed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.smoke:
        args.launches, args.launchers, args.amplify = 1, ["torchrun"], True
    with tempfile.TemporaryDirectory() as tmp:
        shim = build_shim(tmp) if args.amplify else None
        if args.amplify and shim is None:
            print("no C compiler: running without --amplify")
        rows = study(args.launchers, args.variants, args.launches, shim, args.timeout)
    from benchmarks import harness  # imported here: the workers need none of it
    payload = {"world_size": WORLD, "steps": STEPS, "amplified": shim is not None, "shim_env": SHIM_ENV,
               "distlion_timeout": args.timeout, "rows": rows}
    harness.write_results(f"clean_exit-{args.tag}" if args.tag else "clean_exit", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
