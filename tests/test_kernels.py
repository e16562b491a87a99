"""Every kernel backend declares the contract's ops and equals the plain reference bitwise.

``test_backend_follows_the_contract`` walks every backend of ``distlion.kernels.BACKENDS``
(Triton only under ``TRITON_INTERPRET=1``, where it runs on CPU tensors) over every op of
``distlion.kernels.contract.OPS``; the reference itself is held to hand-computed examples.
"""

import functools
import inspect
import os
import subprocess
import sys
import types

import pytest
import torch

from distlion.kernels import BACKENDS, arithmetic, backend, contract, cpu_native, kernels_for, reference, torch_fast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends(split_threads: bool = False) -> list:
    """Every registered backend, as (name, threads); with ``split_threads`` the C one on 1 and on 3 threads."""
    params = []
    for name in BACKENDS:
        marks = [pytest.mark.slow] if name == "triton_kernels" else []  # tier: interpreted on CPU, slow
        if name == "triton_kernels" and os.environ.get("TRITON_INTERPRET") != "1":
            marks.append(pytest.mark.skip(reason="Triton runs on CPU tensors under TRITON_INTERPRET=1 only"))
        for threads in ([1, 3] if split_threads and name == "cpu_native" else [None]):
            test_id = name if threads is None else f"{name}-{threads}thread" + "s" * (threads > 1)
            params.append(pytest.param(name, threads, id=test_id, marks=marks))
    return params


def _load(name: str) -> types.ModuleType:
    if name == "triton_kernels":
        pytest.importorskip("triton")
    return backend(name)


def _split_c_kernels(request, monkeypatch, threads: int) -> None:
    """Run the C kernels on ``threads`` threads, in uneven ranges from 64 coordinates up, for this test."""
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN", 64)
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(threads)


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request, monkeypatch):
    """Run the C kernels on one thread, and split over three with uneven ranges."""
    _split_c_kernels(request, monkeypatch, request.param)
    return request.param


def _inputs(numel: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=gen).to(dtype)
    momentum = torch.randn(numel, generator=gen)
    grad[::5] = 0  # exact zeros of c, where the zero rule decides
    momentum[::5] = 0
    return grad, momentum


def _arguments(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


# ------------------------------------------------------------ one case per contract op
# Each case runs ``impl`` and the reference on the same inputs and compares every output bitwise.

def _case_pack_grads_and_momentum(impl):
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
        flag = impl.pack_grads_and_momentum(grads, views, momentum, bits, scratch, beta1=0.9, beta2=0.99, parity=1)
        assert torch.equal(bits, expected_bits) and not bool(flag)
        assert torch.equal(scratch, expected_momentum)


def _case_pack_signs_and_momentum(impl):
    for dtype in DTYPES:
        for aliased in (True, False):  # the new momentum written into grad, and into its own buffer
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
            flag = impl.pack_signs_and_momentum(grad_in, momentum_in, bits, out, beta1=0.9, beta2=0.99, parity=0)
            assert torch.equal(bits, expected_bits) and bool(flag)
            nan = expected_momentum.isnan()  # the nan gradient gives a nan momentum, as in the reference
            assert torch.equal(out.isnan(), nan) and torch.equal(out[~nan], expected_momentum[~nan])
            assert torch.equal(momentum_in, momentum)  # the old momentum is read, never written


def _case_pack_signs_and_check(impl):
    for dtype in DTYPES:
        for bad in (None, float("inf"), float("nan")):
            grad, momentum = _inputs(64 * 41, dtype)
            if bad is not None:
                grad[64 * 40 + 3] = bad  # in the last thread's range, and in the scalar tail of the C loop
            expected = torch.empty(grad.numel() // 8, dtype=torch.uint8)
            got = torch.empty_like(expected)
            expected_flag = reference.pack_signs_and_check(grad, momentum, expected, beta1=0.9, parity=1)
            flag = impl.pack_signs_and_check(grad, momentum, got, beta1=0.9, parity=1)
            assert torch.equal(expected, got)
            assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) == (bad is not None)
            assert bool(expected_flag) == (bad is not None)


def _case_update_momentum(impl):
    for dtype in DTYPES:
        for momentum_dtype in (torch.float32, torch.bfloat16):
            grad, momentum = _inputs(torch_fast.CHUNK + 64, dtype)
            expected, got = momentum.to(momentum_dtype), momentum.to(momentum_dtype)
            reference.update_momentum(grad, expected, beta2=0.99)
            impl.update_momentum(grad, got, beta2=0.99)
            assert torch.equal(expected, got)


WORLD_SIZES = [*range(1, 9), 13, 64]


def _packed_signs(world_size: int) -> torch.Tensor:
    """Random packed rows; for even N wide enough to span several torch_fast chunks."""
    gen = torch.Generator().manual_seed(world_size)
    chunk = 8 * 37 if world_size % 2 else torch_fast.CHUNK // 8 + 24
    return torch.randint(0, 256, (world_size, chunk), dtype=torch.uint8, generator=gen)


def _case_majority_vote(impl):
    for world_size in WORLD_SIZES:
        packed = _packed_signs(world_size)
        # every casting rank on the CPU backends; the first, middle and last on interpreted Triton
        every = impl in (torch_fast, cpu_native)
        for casting_rank in range(world_size) if every else sorted({0, world_size // 2, world_size - 1}):
            expected, got = (torch.empty(packed.shape[1], dtype=torch.uint8) for _ in range(2))
            reference.majority_vote(packed, expected, casting_rank=casting_rank)
            impl.majority_vote(packed, got, casting_rank=casting_rank)
            assert torch.equal(expected, got)


def _case_vote_counts(impl):
    for world_size in WORLD_SIZES:
        packed = _packed_signs(world_size)
        for planes in (max(1, world_size.bit_length()), world_size.bit_length() + 1):  # and one spare plane
            expected, got = (torch.full((planes, packed.shape[1]), 0x5A, dtype=torch.uint8) for _ in range(2))
            reference.vote_counts(packed, expected)
            impl.vote_counts(packed, got)
            assert torch.equal(expected, got)


def _vote_planes(voters: int, numel: int, seed: int) -> torch.Tensor:
    """Bit-planes of counts of ``voters`` votes (one plane: a majority's bits)."""
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randint(0, 256, (max(1, voters.bit_length()), numel // 8), dtype=torch.uint8, generator=gen)
    if voters > 1:
        planes[-1] &= 0  # keep counts <= N where the top plane would overflow
    return planes


def _case_apply(impl):
    numel = torch_fast.CHUNK + 64 * 5
    for dtype in DTYPES:
        for with_master in ([False] if dtype == torch.float32 else [True, False]):
            for voters in range(1, 8):
                for scaled in (False, True):
                    planes = _vote_planes(voters, numel, seed=voters)
                    param = torch.randn(numel, generator=torch.Generator().manual_seed(3)).to(dtype)
                    results = []
                    for run in (reference, impl):
                        p = param.clone()
                        m = p.float() if with_master else None
                        ema = torch.zeros(numel) if scaled else None
                        for step in (1, 2, 3):
                            run.apply(p, planes, voters=voters, lr=1e-3, weight_decay=0.1, master=m, vote_ema=ema,
                                      beta=0.9, step=step)
                        results.append((p, m, ema))
                    for expected, got in zip(*results):
                        assert (expected is None and got is None) or torch.equal(expected, got), (
                            dtype, with_master, voters, scaled)


CASES = {name[len("_case_"):]: case for name, case in globals().items() if name.startswith("_case_")}


def test_every_op_of_the_contract_has_a_case():
    assert set(CASES) == set(contract.OPS)


@pytest.mark.parametrize("op", contract.OPS)
@pytest.mark.parametrize("name, threads", _backends(split_threads=True))
def test_backend_follows_the_contract(name, threads, op, request, monkeypatch):
    impl = _load(name)
    assert _arguments(inspect.signature(getattr(impl, op))) == _arguments(contract.signature(op))
    if threads is not None:
        _split_c_kernels(request, monkeypatch, threads)
    if impl is not reference:
        CASES[op](impl)


def test_contract_check_names_the_broken_op():
    assert contract.check_backend(reference) is reference
    broken = types.ModuleType("broken")
    for op in contract.OPS:
        setattr(broken, op, getattr(reference, op))
    broken.apply = lambda param, planes, *, voters, lr: None
    del broken.vote_counts
    with pytest.raises(TypeError, match=r"vote_counts is missing; apply\(param, planes, \*, voters, lr\) should be"):
        contract.check_backend(broken)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        backend("cuda")


# ------------------------------------------------------------- the reference, by hand

def test_arithmetic_follows_the_formulas():
    assert arithmetic.average_steps(1).tolist() == [-1.0, 1.0]
    assert arithmetic.average_steps(4).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    third = torch.tensor(1.0) / torch.tensor(3.0)  # fp32 division, as the contract divides
    assert torch.equal(arithmetic.average_steps(3), torch.stack([-third * 3, -third, third, third * 3]))
    assert arithmetic.bias_correction(0.5, 2) == pytest.approx(4 / 3)


def test_reference_pack_follows_the_formula():
    grad = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, -3.0, 0.0, 0.0] * 8)
    momentum = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0] * 8)
    out = torch.empty(8, dtype=torch.uint8)
    # c = [0.1, -0.1, 0, 0, -0.7, 0.6, 0, 0]: signs + - z z - + z z; zeros at even index + (parity 0)
    reference.pack_signs(grad, momentum, out, beta1=0.9, parity=0)
    assert out.tolist() == [0b01100101] * 8
    reference.pack_signs(grad, momentum, out, beta1=0.9, parity=1)  # zeros flip with the step
    assert out.tolist() == [0b10101001] * 8


def test_reference_average_step_follows_the_formula():
    # 3 voters; coordinate j of each byte has count j % 4, spelled by two planes
    planes = torch.tensor([[0b10101010] * 8, [0b11001100] * 8], dtype=torch.uint8)
    param = torch.full((64,), 1.0)
    reference.apply(param, planes, voters=3, lr=0.3, weight_decay=0.0)
    steps = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0] * 16)  # (2k - 3) / 3
    assert torch.allclose(param, 1.0 - 0.3 * steps)


def test_reference_scaled_step_follows_the_formula():
    # one majority plane: coordinates 0-3 voted +, 4-7 voted -; EMA starts at 0
    param, ema = torch.full((64,), 1.0), torch.zeros(64)
    vote = torch.tensor([[0b00001111] * 8], dtype=torch.uint8)
    s = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1] * 8)
    reference.apply(param, vote, voters=1, lr=0.1, weight_decay=0.2, vote_ema=ema, beta=0.5, step=1)
    # e = 0.5 s; bias-corrected 1.0 s: the first step is the full Lion step
    assert torch.allclose(ema, 0.5 * s) and torch.allclose(param, 0.98 - 0.1 * s)
    flipped = torch.tensor([[0b11110000] * 8], dtype=torch.uint8)
    reference.apply(param, flipped, voters=1, lr=0.1, weight_decay=0.0, vote_ema=ema, beta=0.5, step=2)
    # the vote flipped: e = 0.25 s - 0.5 s = -0.25 s, / (1 - 0.25) = -s/3; step (-s) * (1/9)
    assert torch.allclose(ema, -0.25 * s)
    assert torch.allclose(param, 0.98 - 0.1 * s + 0.1 * s / 9)


@pytest.mark.parametrize("name, threads", _backends())
def test_apply_majority_is_decay_then_signed_step(name, threads):
    param = torch.full((64,), 2.0)
    vote = torch.tensor([[0b00000001] + [0] * 7], dtype=torch.uint8)
    _load(name).apply(param, vote, voters=1, lr=0.5, weight_decay=0.1)
    assert param[0].item() == pytest.approx(2.0 * 0.95 - 0.5)
    assert param[1].item() == pytest.approx(2.0 * 0.95 + 0.5)


# ------------------------------------------------------- the CPU backends' own paths

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


def test_majority_tie_takes_the_casting_vote():
    packed = torch.tensor([[0xFF], [0xFF], [0x00], [0x0F]], dtype=torch.uint8).repeat(1, 8)
    out = torch.empty(8, dtype=torch.uint8)
    for impl in (reference, torch_fast, cpu_native):
        impl.majority_vote(packed, out, casting_rank=3)  # bits 0-3: 3 of 4 set; bits 4-7: tie, rank 3 says 0
        assert out.tolist() == [0x0F] * 8
        impl.majority_vote(packed, out, casting_rank=0)  # the tie now goes to rank 0, which says 1
        assert out.tolist() == [0xFF] * 8


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


@pytest.mark.multiprocess
def test_without_a_compiler_the_torch_kernels_take_over(tmp_path):
    code = ("import logging, torch; logging.basicConfig();"
            "from distlion.kernels import kernels_for, torch_fast;"
            "assert kernels_for('cpu') is torch_fast; print('fallback ok')")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DISTLION_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout
    assert "building the C CPU kernels" in done.stderr and "torch ops" in done.stderr
