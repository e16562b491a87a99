"""The fast torch kernels equal the plain reference bitwise; the reference keeps the contract."""

import pytest
import torch

from distlion.kernels import kernels_for, reference, torch_fast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


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
def test_pack_signs_matches_reference(dtype, numel, parity):
    grad, momentum = _inputs(numel, dtype)
    expected = torch.empty(numel // 8, dtype=torch.uint8)
    got = torch.empty_like(expected)
    reference.pack_signs(grad, momentum, expected, beta1=0.9, parity=parity)
    torch_fast.pack_signs(grad, momentum, got, beta1=0.9, parity=parity)
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


@pytest.mark.parametrize("world_size", range(1, 9))
def test_votes_match_reference(world_size):
    gen = torch.Generator().manual_seed(world_size)
    chunk = 8 * 37 if world_size % 2 else torch_fast.CHUNK // 8 + 24
    packed = torch.randint(0, 256, (world_size, chunk), dtype=torch.uint8, generator=gen)
    for casting_rank in range(world_size):
        expected, got = torch.empty(chunk, dtype=torch.uint8), torch.empty(chunk, dtype=torch.uint8)
        reference.majority_vote(packed, expected, casting_rank=casting_rank)
        torch_fast.majority_vote(packed, got, casting_rank=casting_rank)
        assert torch.equal(expected, got)
    planes = max(1, world_size.bit_length())
    expected, got = (torch.empty(planes, chunk, dtype=torch.uint8) for _ in range(2))
    reference.vote_counts(packed, expected)
    torch_fast.vote_counts(packed, got)
    assert torch.equal(expected, got)


def test_majority_tie_takes_the_casting_vote():
    packed = torch.tensor([[0xFF], [0xFF], [0x00], [0x0F]], dtype=torch.uint8).repeat(1, 8)
    out = torch.empty(8, dtype=torch.uint8)
    for impl in (reference, torch_fast):
        impl.majority_vote(packed, out, casting_rank=3)  # bits 0-3: 3 of 4 set; bits 4-7: tie, rank 3 says 0
        assert out.tolist() == [0x0F] * 8
        impl.majority_vote(packed, out, casting_rank=0)  # the tie now goes to rank 0, which says 1
        assert out.tolist() == [0xFF] * 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_apply_matches_reference(dtype, world_size):
    numel = torch_fast.CHUNK + 64 * 5
    gen = torch.Generator().manual_seed(3)
    planes = max(1, world_size.bit_length())
    counts = torch.randint(0, 256, (planes, numel // 8), dtype=torch.uint8, generator=gen)
    counts[-1] &= 0  # keep counts <= N where the top plane would overflow
    param = torch.randn(numel, generator=gen).to(dtype)
    master = param.float() if dtype != torch.float32 else None
    results = []
    for impl in (reference, torch_fast):
        p, m = param.clone(), None if master is None else master.clone()
        impl.apply_majority(p, counts[0], lr=1e-3, weight_decay=0.1, master=m)
        impl.apply_average(p, counts, world_size=world_size, lr=1e-3, weight_decay=0.1, master=m)
        results.append((p, m))
    assert torch.equal(results[0][0], results[1][0])
    if master is not None:
        assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_momentum_matches_reference(dtype, momentum_dtype):
    grad, momentum = _inputs(torch_fast.CHUNK + 64, dtype)
    expected, got = momentum.to(momentum_dtype), momentum.to(momentum_dtype)
    reference.update_momentum(grad, expected, beta2=0.99)
    torch_fast.update_momentum(grad, got, beta2=0.99)
    assert torch.equal(expected, got)


def test_apply_majority_is_decay_then_signed_step():
    param = torch.full((64,), 2.0)
    vote = torch.tensor([0b00000001] + [0] * 7, dtype=torch.uint8)
    torch_fast.apply_majority(param, vote, lr=0.5, weight_decay=0.1)
    assert param[0].item() == pytest.approx(2.0 * 0.95 - 0.5)
    assert param[1].item() == pytest.approx(2.0 * 0.95 + 0.5)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_detects_inf_and_nan(bad):
    grad = torch.zeros(128)
    for impl in (reference, torch_fast):
        assert not impl.nonfinite(grad)
    grad[77] = bad
    for impl in (reference, torch_fast):
        assert impl.nonfinite(grad)


def test_cpu_tensors_use_the_torch_kernels():
    assert kernels_for("cpu") is torch_fast
