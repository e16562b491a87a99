"""The fast CPU kernels (C and torch ops) equal the plain reference bitwise; the reference keeps the contract."""

import os
import subprocess
import sys

import pytest
import torch

from distlion.kernels import cpu_native, kernels_for, reference, torch_fast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = [pytest.param(torch_fast, id="torch_fast"), pytest.param(cpu_native, id="cpu_native")]


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request, monkeypatch):
    """Run the C kernels on one thread, and split over three with uneven ranges."""
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _inputs(numel: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=gen).to(dtype)
    momentum = torch.randn(numel, generator=gen)
    grad[::5] = 0  # exact zeros of c, where the zero rule decides
    momentum[::5] = 0
    return grad, momentum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [64, 64 * 7, torch_fast.CHUNK + 64 * 3])
@pytest.mark.parametrize("parity", [0, 1])
def test_pack_signs_matches_reference(dtype, numel, parity, threads):
    grad, momentum = _inputs(numel, dtype)
    expected = torch.empty(numel // 8, dtype=torch.uint8)
    got = torch.empty_like(expected)
    reference.pack_signs(grad, momentum, expected, beta1=0.9, parity=parity)
    cpu_native.pack_signs(grad, momentum, got, beta1=0.9, parity=parity)
    assert torch.equal(expected, got)
    torch_fast.pack_signs(grad, momentum, got.zero_(), beta1=0.9, parity=parity)
    assert torch.equal(expected, got)
    # the torch-ops packer (used off the CPU) gives the same bits
    torch_fast.pack_into(grad, momentum, got.zero_(), beta1=0.9, parity=parity, packer=torch_fast._TorchPacker)
    assert torch.equal(expected, got)


def test_reference_pack_follows_the_formula():
    grad = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, -3.0, 0.0, 0.0] * 8)
    momentum = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0] * 8)
    out = torch.empty(8, dtype=torch.uint8)
    # c = [0.1, -0.1, 0, 0, -0.7, 0.6, 0, 0]: signs + - z z - + z z; zeros at even index + (parity 0)
    reference.pack_signs(grad, momentum, out, beta1=0.9, parity=0)
    assert out.tolist() == [0b01100101] * 8
    reference.pack_signs(grad, momentum, out, beta1=0.9, parity=1)  # zeros flip with the step
    assert out.tolist() == [0b10101001] * 8


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("world_size", [*range(1, 9), 13, 64])
def test_votes_match_reference(world_size, fast, threads):
    gen = torch.Generator().manual_seed(world_size)
    chunk = 8 * 37 if world_size % 2 else torch_fast.CHUNK // 8 + 24
    packed = torch.randint(0, 256, (world_size, chunk), dtype=torch.uint8, generator=gen)
    for casting_rank in range(world_size):
        expected, got = torch.empty(chunk, dtype=torch.uint8), torch.empty(chunk, dtype=torch.uint8)
        reference.majority_vote(packed, expected, casting_rank=casting_rank)
        fast.majority_vote(packed, got, casting_rank=casting_rank)
        assert torch.equal(expected, got)
    planes = max(1, world_size.bit_length())
    expected, got = (torch.empty(planes, chunk, dtype=torch.uint8) for _ in range(2))
    reference.vote_counts(packed, expected)
    fast.vote_counts(packed, got)
    assert torch.equal(expected, got)


def test_majority_tie_takes_the_casting_vote():
    packed = torch.tensor([[0xFF], [0xFF], [0x00], [0x0F]], dtype=torch.uint8).repeat(1, 8)
    out = torch.empty(8, dtype=torch.uint8)
    for impl in (reference, torch_fast, cpu_native):
        impl.majority_vote(packed, out, casting_rank=3)  # bits 0-3: 3 of 4 set; bits 4-7: tie, rank 3 says 0
        assert out.tolist() == [0x0F] * 8
        impl.majority_vote(packed, out, casting_rank=0)  # the tie now goes to rank 0, which says 1
        assert out.tolist() == [0xFF] * 8


def _apply_inputs(voters: int, dtype: torch.dtype, seed: int):
    """Vote-count planes for ``voters`` (one plane: a majority's bits), a parameter, its master or None."""
    numel = torch_fast.CHUNK + 64 * 5
    gen = torch.Generator().manual_seed(seed)
    planes = max(1, voters.bit_length())
    counts = torch.randint(0, 256, (planes, numel // 8), dtype=torch.uint8, generator=gen)
    if voters > 1:
        counts[-1] &= 0  # keep counts <= N where the top plane would overflow
    param = torch.randn(numel, generator=gen).to(dtype)
    return counts, param, param.float() if dtype != torch.float32 else None


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_apply_matches_reference(dtype, world_size, fast, threads):
    counts, param, master = _apply_inputs(world_size, dtype, seed=3)
    results = []
    for impl in (reference, fast):
        p, m = param.clone(), None if master is None else master.clone()
        impl.apply_majority(p, counts[0], lr=1e-3, weight_decay=0.1, master=m)
        impl.apply_average(p, counts, world_size=world_size, lr=1e-3, weight_decay=0.1, master=m)
        results.append((p, m))
    assert torch.equal(results[0][0], results[1][0])
    if master is not None:
        assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("voters", [1, 2, 3, 4, 7])
def test_apply_scaled_matches_reference(dtype, voters, fast, threads):
    counts, param, master = _apply_inputs(voters, dtype, seed=4)
    numel = param.numel()
    results = []
    for impl in (reference, fast):
        p, m, ema = param.clone(), None if master is None else master.clone(), torch.zeros(numel)
        for step in (1, 2, 3):
            impl.apply_scaled(p, counts, ema, voters=voters, beta=0.9, step=step, lr=1e-3, weight_decay=0.1, master=m)
        results.append((p, m, ema))
    for expected, got in zip(results[0], results[1]):
        assert (expected is None and got is None) or torch.equal(expected, got)


def test_reference_scaled_step_follows_the_formula():
    # one majority plane: coordinates 0-3 voted +, 4-7 voted -; EMA starts at 0
    param, ema = torch.full((64,), 1.0), torch.zeros(64)
    vote = torch.tensor([[0b00001111] * 8], dtype=torch.uint8)
    s = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1] * 8)
    reference.apply_scaled(param, vote, ema, voters=1, beta=0.5, step=1, lr=0.1, weight_decay=0.2)
    # e = 0.5 s; bias-corrected 1.0 s: the first step is the full Lion step
    assert torch.allclose(ema, 0.5 * s) and torch.allclose(param, 0.98 - 0.1 * s)
    flipped = torch.tensor([[0b11110000] * 8], dtype=torch.uint8)
    reference.apply_scaled(param, flipped, ema, voters=1, beta=0.5, step=2, lr=0.1, weight_decay=0.0)
    # the vote flipped: e = 0.25 s - 0.5 s = -0.25 s, / (1 - 0.25) = -s/3; step (-s) * (1/9)
    assert torch.allclose(ema, -0.25 * s)
    assert torch.allclose(param, 0.98 - 0.1 * s + 0.1 * s / 9)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_momentum_matches_reference(dtype, momentum_dtype, fast, threads):
    grad, momentum = _inputs(torch_fast.CHUNK + 64, dtype)
    expected, got = momentum.to(momentum_dtype), momentum.to(momentum_dtype)
    reference.update_momentum(grad, expected, beta2=0.99)
    fast.update_momentum(grad, got, beta2=0.99)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("fast", FAST)
def test_apply_majority_is_decay_then_signed_step(fast):
    param = torch.full((64,), 2.0)
    vote = torch.tensor([0b00000001] + [0] * 7, dtype=torch.uint8)
    fast.apply_majority(param, vote, lr=0.5, weight_decay=0.1)
    assert param[0].item() == pytest.approx(2.0 * 0.95 - 0.5)
    assert param[1].item() == pytest.approx(2.0 * 0.95 + 0.5)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_detects_inf_and_nan(bad, threads):
    grad = torch.zeros(64 * 40)
    for impl in (reference, torch_fast, cpu_native):
        assert not impl.nonfinite(grad)
    for where in (77, grad.numel() - 1):  # in the first thread's range, and in the last
        grad.zero_()[where] = bad
        for impl in (reference, torch_fast, cpu_native):
            assert impl.nonfinite(grad)


def test_cpu_tensors_use_the_compiled_kernels():
    # a machine with a C compiler (CI has one) must take the C path, or the tests above test torch twice
    assert cpu_native.available()
    assert kernels_for("cpu") is cpu_native


def test_without_a_compiler_the_torch_kernels_take_over(tmp_path):
    code = ("import logging, torch; logging.basicConfig();"
            "from distlion.kernels import kernels_for, torch_fast;"
            "assert kernels_for('cpu') is torch_fast; print('fallback ok')")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DISTLION_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout
    assert "building the C CPU kernels" in done.stderr and "torch ops" in done.stderr


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
def test_pack_signs_and_check_packs_and_flags(fast, bad, threads):
    grad, momentum = _inputs(64 * 41, torch.float32)
    if bad is not None:
        grad[64 * 40 + 3] = bad  # in the last thread's range, and in the scalar tail of the C loop
    expected = torch.empty(grad.numel() // 8, dtype=torch.uint8)
    got = torch.empty_like(expected)
    reference.pack_signs(grad, momentum, expected, beta1=0.9, parity=1)
    flag = fast.pack_signs_and_check(grad, momentum, got, beta1=0.9, parity=1)
    assert torch.equal(expected, got)
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) == (bad is not None)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aliased", [True, False], ids=["into_grad", "separate"])
def test_pack_signs_and_momentum_packs_and_updates(fast, dtype, aliased, threads):
    grad, momentum = _inputs(torch_fast.CHUNK + 64 * 3, dtype)
    momentum = momentum.to(dtype)
    grad[100] = float("nan")
    expected_bits = torch.empty(grad.numel() // 8, dtype=torch.uint8)
    reference.pack_signs(grad, momentum, expected_bits, beta1=0.9, parity=0)
    expected_momentum = momentum.clone()
    reference.update_momentum(grad, expected_momentum, beta2=0.99)
    bits = torch.empty_like(expected_bits)
    grad_in, momentum_in = grad.clone(), momentum.clone()
    out = grad_in if aliased else torch.empty_like(momentum)
    flag = fast.pack_signs_and_momentum(grad_in, momentum_in, bits, out, beta1=0.9, beta2=0.99, parity=0)
    assert torch.equal(bits, expected_bits) and bool(flag)
    nan = expected_momentum.isnan()  # the nan gradient gives a nan momentum, as in the reference
    assert torch.equal(out.isnan(), nan) and torch.equal(out[~nan], expected_momentum[~nan])
    assert torch.equal(momentum_in, momentum)  # the old momentum is read, never written


@pytest.mark.parametrize("fast", FAST)
def test_pack_grads_and_momentum_reads_scattered_gradients(fast, threads):
    # parameters of odd sizes, one without a gradient, one non-contiguous, and padding at the end
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 517, 64, 1, 2500, 130]
    numel = 64 * 60  # 3840 > sum(sizes) = 3215: padding
    grads = [torch.randn(n, generator=gen) for n in sizes]
    grads[2] = None
    grads[4] = torch.randn(50, 50, generator=gen).t()  # non-contiguous: taken through a gather copy
    momentum = torch.randn(numel, generator=gen)
    momentum[sum(sizes):] = 0  # padding momentum stays zero, as in the optimizer
    flat = torch.zeros(numel)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for g, o, n in zip(grads, offsets, sizes):
        if g is not None:
            flat[o:o + n] = g.reshape(-1)
    expected_bits = torch.empty(numel // 8, dtype=torch.uint8)
    expected_momentum = momentum.clone()
    reference.pack_signs(flat, momentum, expected_bits, beta1=0.9, parity=1)
    reference.update_momentum(flat, expected_momentum, beta2=0.99)
    for contiguous in (False, True):  # with and without the non-contiguous gradient
        if contiguous:
            grads[4] = grads[4].contiguous()
        scratch = torch.full((numel,), 7.0)  # old contents of the slots must not leak into the result
        scratch[sum(sizes):] = 0  # padding holds zero, as the optimizer keeps it
        shapes = [(n,) if g is None else g.shape for g, n in zip(grads, sizes)]
        views = [scratch[o:o + n].view(shape) for o, n, shape in zip(offsets, sizes, shapes)]
        bits = torch.empty_like(expected_bits)
        flag = fast.pack_grads_and_momentum(grads, views, momentum, bits, scratch, beta1=0.9, beta2=0.99, parity=1)
        assert torch.equal(bits, expected_bits) and not bool(flag)
        assert torch.equal(scratch, expected_momentum)
