"""DistLion on a CUDA GPU against the same optimizer on CPU and the N-worker simulation.

Skipped without CUDA. On a GPU this covers what the CPU runs cannot: the Triton kernels
chosen by ``kernels_for`` inside a real step, NCCL (world size 1: NCCL refuses two ranks
on one GPU), and several gloo ranks whose buckets live on the GPU (the exchange stages
the packed bytes through CPU buffers for gloo).
"""

import pytest
import torch

from distlion import DistLion
from multiprocess import run_ranks
from simulation import BETAS, LR, WD, _grads, _params, simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 6


def _history(device: str, dtype: torch.dtype, vote: str = "majority", exchange: str = "auto", rank: int = 0,
             vote_ema_beta: float | None = None):
    """Train the test_distributed parameters for STEPS steps on ``device``; return them per step, on CPU."""
    params = [torch.nn.Parameter(p.detach().to(device, dtype)) for p in _params()]
    opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, vote=vote, exchange=exchange,
                   vote_ema_beta=vote_ema_beta)
    history = []
    for step in range(1, STEPS + 1):
        for p, g in zip(params, _grads(rank, step, "ties" if step % 2 else "random")):
            p.grad = g.to(device, dtype)
        opt.step()
        history.append([p.detach().cpu().clone() for p in params])
    return history


def _assert_bitwise(got, expected):
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y), f"step {step}: max difference {(x - y).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vote_ema_beta", [None, 0.9], ids=["lion_step", "scaled_step"])
def test_cuda_step_equals_cpu_step_bitwise(dtype, vote_ema_beta):
    from distlion.kernels import kernels_for, triton_kernels
    assert kernels_for("cuda") is triton_kernels
    _assert_bitwise(_history("cuda", dtype, vote_ema_beta=vote_ema_beta),
                    _history("cpu", dtype, vote_ema_beta=vote_ema_beta))


def _nccl_world_of_one(rank, world_size):
    return _history("cuda", torch.float32)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_nccl_world_size_one_equals_single_process():
    [got] = run_ranks(_nccl_world_of_one, 1, backend="nccl")
    _assert_bitwise(got, _history("cpu", torch.float32))


def _gloo_ranks_on_gpu(rank, world_size, vote, exchanges):
    torch.cuda.set_device(0)  # one GPU shared by every rank: gloo moves the staged bytes between them
    results = {}
    for exchange in exchanges:
        params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
        opt = DistLion(params, lr=LR, betas=BETAS, weight_decay=WD, vote=vote, exchange=exchange)
        history = []
        for step in range(1, STEPS + 1):
            for p, g in zip(params, _grads(rank, step, "ties")):
                p.grad = g.cuda()
            opt.step()
            history.append([p.detach().cpu().clone() for p in params])
        results[exchange] = history
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size, vote", [(3, "majority"), (4, "majority"), (3, "average")])
def test_gloo_ranks_with_gpu_buckets_match_simulation(world_size, vote):
    exchanges = ["two_phase", "all_gather"]
    expected = simulate(world_size, STEPS, "ties", vote=vote)
    for per_rank in run_ranks(_gloo_ranks_on_gpu, world_size, vote, exchanges):
        for exchange in exchanges:
            _assert_bitwise(per_rank[exchange], expected)
