"""The Triton kernels against the reference oracle, bit for bit.

Without CUDA the kernels run on CPU tensors through the Triton interpreter. Triton
decides between compiling and interpreting when ``@triton.jit`` decorates a kernel,
so the switch is set before ``distlion.kernels.triton_kernels`` is imported (and the
module is reloaded if something imported it earlier without the switch).

The oracle always runs on CPU copies: it is the contract's arithmetic. (On CUDA,
torch divides by a Python scalar as a multiply by its fp32 reciprocal, so the
reference run on CUDA tensors is not the contract for ``apply`` of an average vote with N >= 6.)

Inputs are chosen so that a near miss fails: momenta that cancel the gradient up to
the rounding of one product (an unfused ``mul`` + ``add`` flips those signs), values
on the scale of ``lr`` (a reciprocal instead of a division, or an unfused update,
changes their last bits), and exact ties for the bf16/fp16 rounding.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorations

import pytest  # noqa: E402

pytest.importorskip("triton")

from distlion.kernels import reference  # noqa: E402
from distlion.kernels import triton_kernels  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton_kernels._pack_signs_kernel, InterpretedFunction):
        triton_kernels = importlib.reload(triton_kernels)  # imported before the switch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16, torch.uint8: torch.uint8}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # tier: the interpreter on CPU is slow


def dev(tensor: torch.Tensor) -> torch.Tensor:
    """Return a copy on DEVICE (a plain ``.to("cpu")`` would alias the oracle's input)."""
    return tensor.to(DEVICE, copy=True)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Fail unless both tensors hold the same dtype, shape and bits."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a = actual.detach().cpu().flatten()
    e = expected.detach().cpu().flatten()
    differ = (a.view(_INT_VIEW[a.dtype]) != e.view(_INT_VIEW[e.dtype])).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{differ.numel()} of {a.numel()} differ; first at flat index {differ[0].item()}: "
        f"{a[differ[0]].item()!r} vs {e[differ[0]].item()!r}")


@pytest.fixture(params=["default", "small"])
def block(request, monkeypatch):
    """Run with the module's blocks, then with tiny ones: many programs and a ragged tail."""
    if request.param == "small":
        monkeypatch.setattr(triton_kernels, "BLOCK", 256)
        monkeypatch.setattr(triton_kernels, "VOTE_BLOCK", 32)
    return request.param


def _values(numel: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Return normal values of mixed magnitudes around ``scale``, with zeros and -0.0 (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-12, 12, (numel,), generator=gen).float()
    x = torch.randn(numel, generator=gen) * torch.exp2(exponents) * scale
    x[::7] = 0.0
    x[3::11] = -0.0
    return x.to(dtype)


def _cancelling_momentum(grad: torch.Tensor, beta1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (momentum, where) with fp32(m*b1) == -fp32(g*(1-b1)) exactly where ``where``.

    There c = fma(g, 1-b1, m*b1) is the rounding error of g*(1-b1): a sign set by the
    fma alone, while an unfused multiply-add gives exactly 0 and the zero rule.
    """
    b1 = torch.tensor(beta1, dtype=F32)
    target = -(grad.float() * (1.0 - beta1))
    momentum = target / b1
    for _ in range(2):  # step towards a momentum whose rounded product hits the target
        product = momentum * b1
        momentum = torch.where(product == target, momentum,
                               torch.nextafter(momentum, torch.where(product < target, torch.inf, -torch.inf)))
    hit = (momentum * b1 == target) & (grad != 0)
    return momentum, hit


# A size that is no multiple of any block (64 * 37 coordinates, 296 bytes, 74 words),
# and one that spans two programs of the interpreter's default block.
SIZES = [64 * 37, triton_kernels.BLOCK + 64 * 3]


@pytest.mark.parametrize("grad_dtype,mom_dtype", [(F32, F32), (BF16, BF16), (F16, F32), (BF16, F32), (F32, BF16)])
@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_pack_signs(block, grad_dtype, mom_dtype, beta1):
    d = SIZES[0]
    grad = _values(d, grad_dtype, 1)
    momentum = _values(d, mom_dtype, 2)
    if mom_dtype == F32:
        cancelling, hit = _cancelling_momentum(grad, beta1)
        assert hit.sum() > d // 4
        momentum = torch.where(hit, cancelling, momentum)
    grad[1::13] = float("inf")
    grad[2::17] = float("nan")
    for parity in (0, 1, 7):
        out = torch.full((d // 8,), 0xA5, dtype=torch.uint8, device=DEVICE)
        triton_kernels.pack_signs(dev(grad), dev(momentum), out, beta1=beta1, parity=parity)
        expected = torch.empty(d // 8, dtype=torch.uint8)
        reference.pack_signs(grad, momentum, expected, beta1=beta1, parity=parity)
        assert_bitwise(out, expected)


def test_pack_signs_two_default_blocks():
    d = SIZES[1]
    grad, momentum = _values(d, F32, 3), _values(d, F32, 4)
    out = torch.empty(d // 8, dtype=torch.uint8, device=DEVICE)
    triton_kernels.pack_signs(dev(grad), dev(momentum), out, beta1=0.9, parity=1)
    expected = torch.empty(d // 8, dtype=torch.uint8)
    reference.pack_signs(grad, momentum, expected, beta1=0.9, parity=1)
    assert_bitwise(out, expected)


def test_pack_signs_zero_rule_alternates():
    zeros = torch.zeros(128, device=DEVICE)
    out = torch.empty(16, dtype=torch.uint8, device=DEVICE)
    triton_kernels.pack_signs(zeros, zeros, out, beta1=0.9, parity=0)
    assert (out.cpu() == 0b01010101).all()  # even coordinates vote +
    triton_kernels.pack_signs(zeros, zeros, out, beta1=0.9, parity=1)
    assert (out.cpu() == 0b10101010).all()


@pytest.mark.parametrize("grad_dtype,mom_dtype", [(F32, F32), (BF16, BF16), (F16, BF16), (BF16, F32)])
@pytest.mark.parametrize("beta2", [0.99, 0.999])
def test_update_momentum(block, grad_dtype, mom_dtype, beta2):
    d = SIZES[0]
    grad, momentum = _values(d, grad_dtype, 5), _values(d, mom_dtype, 6)
    if mom_dtype == F32:
        # Cancellation again: the fma decides the last bits of a result near zero.
        cancelling, hit = _cancelling_momentum(grad, beta2)
        momentum = torch.where(hit, cancelling, momentum)
    actual = dev(momentum)
    triton_kernels.update_momentum(dev(grad), actual, beta2=beta2)
    reference.update_momentum(grad, momentum, beta2=beta2)
    assert_bitwise(actual, momentum)


def _rounding_cases(numel: int, nan: bool = False) -> torch.Tensor:
    """Return fp32 values that stress rounding to bf16/fp16: ties, subnormals, overflow, maybe NaN."""
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (numel,), generator=gen, dtype=torch.int64)
    bits[0::4] = (bits[0::4] & ~0xFFFF) | 0x8000  # exact bf16 ties, both parities of the kept bit
    bits[1::4] = (bits[1::4] & ~0x1FFF) | 0x1000  # exact fp16 ties (13 dropped bits)
    bits[1::8] &= ~(0x7F << 24)                   # and some of them in fp16's range
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.where(torch.isnan(x), torch.tensor(1.5), x)  # no random NaNs; `nan` adds plain ones
    x[2::16] = torch.finfo(torch.float32).max               # rounds up to bf16 inf
    x[3::16] = 65520.0                                      # the tie at fp16's top: rounds to inf
    x[5::16] = 1e-40                                        # fp32 subnormal
    x[6::16] = 3e-8                                         # fp16 subnormal
    if nan:
        x[7::16] = float("nan")
    return x


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy's fp16 cast, on purpose
@pytest.mark.parametrize("mom_dtype", [BF16, F16])
def test_update_momentum_rounds_like_torch(mom_dtype):
    # beta2 = 0 makes the new momentum exactly grad, so the store's rounding is all that is tested.
    d = 1024
    # torch writes any NaN as bf16 0xFFFF; its fp16 NaN bits depend on the code path.
    grad = _rounding_cases(d, nan=mom_dtype == BF16)
    momentum = torch.ones(d, dtype=mom_dtype)
    actual = dev(momentum)
    triton_kernels.update_momentum(dev(grad), actual, beta2=0.0)
    reference.update_momentum(grad, momentum, beta2=0.0)
    assert_bitwise(actual, momentum)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, torch.float64])
def test_nonfinite(block, dtype):
    d = SIZES[0]
    clean = _values(d, dtype, 8)
    cases = [clean]
    for index, value in [(d - 1, float("inf")), (d // 2, float("nan")), (0, float("-inf"))]:
        dirty = clean.clone()
        dirty[index] = value
        cases.append(dirty)
    for grad in cases:
        result = triton_kernels.nonfinite(dev(grad))
        assert result.dtype == torch.bool and result.dim() == 0 and result.device.type == DEVICE
        assert result.item() == reference.nonfinite(grad).item()
    assert not triton_kernels.nonfinite(torch.empty(0, dtype=dtype, device=DEVICE)).item()


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_pack_signs_and_check(block, dtype):
    d = SIZES[0]
    grad, momentum = _values(d, dtype, 9), _values(d, F32, 10)
    for bad in (None, float("nan"), float("-inf")):
        if bad is not None:
            grad[d // 3] = bad
        expected = torch.empty(d // 8, dtype=torch.uint8)
        reference.pack_signs(grad, momentum, expected, beta1=0.9, parity=0)
        actual = torch.empty(d // 8, dtype=torch.uint8, device=DEVICE)
        flag = triton_kernels.pack_signs_and_check(dev(grad), dev(momentum), actual, beta1=0.9, parity=0)
        assert_bitwise(actual, expected)
        assert flag.item() == (bad is not None)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("aliased", [True, False], ids=["into_grad", "separate"])
def test_pack_signs_and_momentum(block, dtype, aliased):
    d = SIZES[1]
    grad, momentum = _values(d, dtype, 11), _values(d, dtype, 12)
    expected_bits = torch.empty(d // 8, dtype=torch.uint8)
    reference.pack_signs(grad, momentum, expected_bits, beta1=0.9, parity=1)
    expected_momentum = momentum.clone()
    reference.update_momentum(grad, expected_momentum, beta2=0.99)
    g, m = dev(grad), dev(momentum)
    out = g if aliased else torch.empty_like(m)
    bits = torch.empty(d // 8, dtype=torch.uint8, device=DEVICE)
    flag = triton_kernels.pack_signs_and_momentum(g, m, bits, out, beta1=0.9, beta2=0.99, parity=1)
    assert_bitwise(bits, expected_bits)
    assert_bitwise(out, expected_momentum)
    assert_bitwise(m, momentum)
    assert not flag.item()


def test_pack_grads_and_momentum(block):
    d = SIZES[1]
    sizes = [5, 1000, d - 64 - 1005]  # 64 coordinates of padding
    grad, momentum = _values(d, F32, 13), _values(d, F32, 14)
    grad[sum(sizes):] = 0
    momentum[sum(sizes):] = 0
    expected_bits = torch.empty(d // 8, dtype=torch.uint8)
    reference.pack_signs(grad, momentum, expected_bits, beta1=0.9, parity=0)
    expected_momentum = momentum.clone()
    reference.update_momentum(grad, expected_momentum, beta2=0.99)
    scratch = torch.zeros(d, device=DEVICE)
    views = list(scratch.split(sizes + [64]))[:3]
    grads = [dev(g) for g in grad.split(sizes + [64])[:3]]
    bits = torch.empty(d // 8, dtype=torch.uint8, device=DEVICE)
    flag = triton_kernels.pack_grads_and_momentum(grads, views, dev(momentum), bits, scratch, beta1=0.9,
                                                  beta2=0.99, parity=0)
    assert_bitwise(bits, expected_bits)
    assert_bitwise(scratch, expected_momentum)
    assert not flag.item()


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """Pack bools [..., 8k] into bytes, bit j of byte k = coordinate 8k + j."""
    weights = 2 ** torch.arange(8, dtype=torch.int32)
    return (bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _packed_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Return packed rows: every count 0..rows in the first third, ties in the second, random after."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    third = cols // 3
    coordinate = torch.arange(third * 8)
    count = coordinate % (rows + 1)  # coordinate k is set in its first (k mod (rows+1)) rows
    packed[:, :third] = _pack(torch.arange(rows)[:, None] < count[None, :])
    if rows % 2 == 0:  # the second half of the rows is the complement of the first: all tie
        packed[rows // 2:, third:2 * third] = ~packed[:rows // 2, third:2 * third]
    return packed


# Byte counts: a multiple of 4 (int32 words) and not (bytes), none a multiple of a block.
COLS = [8 * 37, 8 * 37 + 3]


def _check_majority_vote(rows: int, cols: int) -> None:
    """Compare the vote of several casting ranks with the reference."""
    packed = _packed_rows(rows, cols, rows)
    for casting_rank in sorted({0, rows // 2, rows - 1}):
        out = torch.full((cols,), 0x5A, dtype=torch.uint8, device=DEVICE)
        triton_kernels.majority_vote(dev(packed), out, casting_rank=casting_rank)
        expected = torch.empty(cols, dtype=torch.uint8)
        reference.majority_vote(packed, expected, casting_rank=casting_rank)
        assert_bitwise(out, expected)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 17])
@pytest.mark.parametrize("cols", COLS)
def test_majority_vote(block, rows, cols):
    _check_majority_vote(rows, cols)


@pytest.mark.parametrize("rows", [64, 100])
def test_majority_vote_many_rows(rows):
    _check_majority_vote(rows, COLS[0])


def test_majority_vote_ties_follow_casting_rank():
    rows, cols = 4, 64
    packed = torch.zeros(rows, cols, dtype=torch.uint8)
    packed[0] = 0xFF
    packed[2] = 0xFF  # every coordinate has exactly 2 of 4 votes: a tie everywhere
    out = torch.empty(cols, dtype=torch.uint8, device=DEVICE)
    for casting_rank in range(rows):
        triton_kernels.majority_vote(dev(packed), out, casting_rank=casting_rank)
        assert (out.cpu() == packed[casting_rank]).all()


def test_majority_vote_into_unaligned_slice():
    # A vote written into a slice at an odd byte offset cannot use int32 words.
    rows, cols = 3, 64
    packed = _packed_rows(rows, cols, 40)
    buffer = torch.zeros(cols + 1, dtype=torch.uint8, device=DEVICE)
    triton_kernels.majority_vote(dev(packed), buffer[1:], casting_rank=0)
    expected = torch.empty(cols, dtype=torch.uint8)
    reference.majority_vote(packed, expected, casting_rank=0)
    assert_bitwise(buffer[1:], expected)
    assert buffer[0].item() == 0


def _check_vote_counts(rows: int, cols: int) -> None:
    """Compare the count planes, as many as needed and two spare, with the reference."""
    packed = _packed_rows(rows, cols, 10 + rows)
    for planes in (rows.bit_length(), rows.bit_length() + 2):
        out = torch.full((planes, cols), 0x5A, dtype=torch.uint8, device=DEVICE)
        triton_kernels.vote_counts(dev(packed), out)
        expected = torch.empty(planes, cols, dtype=torch.uint8)
        reference.vote_counts(packed, expected)
        assert_bitwise(out, expected)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", COLS)
def test_vote_counts(block, rows, cols):
    _check_vote_counts(rows, cols)


def test_vote_counts_many_rows():
    _check_vote_counts(100, COLS[0])


# (param dtype, with fp32 master weights)
PARAMS = [(F32, False), (BF16, True), (F16, True), (BF16, False)]


def _run_apply(param_dtype, with_master: bool, planes: torch.Tensor, *, voters: int, lr: float,
               weight_decay: float, scaled: bool = False) -> None:
    """Apply a vote with the Triton kernel and the reference; compare param, master and the vote EMA."""
    d = planes.shape[-1] * 8
    # Values on the scale of lr, where the last bits of the step survive the rounding.
    master = _values(d, F32, 9, scale=lr) if with_master else None
    param = master.to(param_dtype) if with_master else _values(d, param_dtype, 9, scale=lr)
    ema = _values(d, F32, 10, scale=0.5) if scaled else None
    got = [dev(param), dev(master) if with_master else None, dev(ema) if scaled else None]
    triton_kernels.apply(got[0], dev(planes), voters=voters, lr=lr, weight_decay=weight_decay, master=got[1],
                         vote_ema=got[2], beta=0.9, step=3)
    reference.apply(param, planes, voters=voters, lr=lr, weight_decay=weight_decay, master=master, vote_ema=ema,
                    beta=0.9, step=3)
    for actual, expected in zip(got, (param, master, ema)):
        if expected is not None:
            assert_bitwise(actual, expected)


@pytest.mark.parametrize("param_dtype,with_master", PARAMS)
@pytest.mark.parametrize("lr,weight_decay", [(1e-3, 0.1), (3e-4, 0.0)])
def test_apply_majority(block, param_dtype, with_master, lr, weight_decay):
    planes = _packed_rows(1, SIZES[0] // 8, 20)
    _run_apply(param_dtype, with_master, planes, voters=1, lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize("param_dtype,with_master", PARAMS)
@pytest.mark.parametrize("voters", [1, 4, 7])
def test_apply_scaled(block, param_dtype, with_master, voters):
    planes = _packed_rows(max(1, voters.bit_length()), SIZES[0] // 8, 21)
    if voters > 1:
        planes[-1] &= 0  # counts <= N
    _run_apply(param_dtype, with_master, planes, voters=voters, lr=1e-3, weight_decay=0.1, scaled=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy's fp16 cast, on purpose
@pytest.mark.parametrize("param_dtype", [BF16, F16])
def test_apply_rounds_master_like_torch(param_dtype):
    # lr = 0 leaves the master unchanged, so param = round(master) is all that is tested.
    d = 1024
    master = _rounding_cases(d)  # no NaN: a GPU fma returns the canonical NaN, not the input's
    param = torch.zeros(d, dtype=param_dtype)
    vote = torch.zeros(1, d // 8, dtype=torch.uint8)
    actual_param, actual_master = dev(param), dev(master)
    triton_kernels.apply(actual_param, dev(vote), voters=1, lr=0.0, weight_decay=0.0, master=actual_master)
    reference.apply(param, vote, voters=1, lr=0.0, weight_decay=0.0, master=master)
    assert_bitwise(actual_param, param)
    assert_bitwise(actual_master, master)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 6, 7, 8, 100])
def test_apply_average(block, world_size):
    cols = SIZES[0] // 8
    counts = torch.empty(world_size.bit_length(), cols, dtype=torch.uint8)
    reference.vote_counts(_packed_rows(world_size, cols, 30 + world_size), counts)
    for param_dtype, with_master in PARAMS if world_size in (3, 6, 7) else PARAMS[:2]:
        _run_apply(param_dtype, with_master, counts, voters=world_size, lr=1e-3, weight_decay=0.1)


def test_errors_name_the_bad_value():
    packed = torch.zeros(4, 16, dtype=torch.uint8, device=DEVICE)
    out = torch.empty(16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="casting_rank.*got 4"):
        triton_kernels.majority_vote(packed, out, casting_rank=4)
    with pytest.raises(ValueError, match="at least 3 planes for 4 rows, got 2"):
        triton_kernels.vote_counts(packed, torch.empty(2, 16, dtype=torch.uint8, device=DEVICE))
    grad = torch.zeros(128, device=DEVICE)
    with pytest.raises(ValueError, match=r"out must be contiguous uint8 with shape \(16,\)"):
        triton_kernels.pack_signs(grad, grad, torch.empty(8, dtype=torch.uint8, device=DEVICE), beta1=0.9, parity=0)
    votes = torch.zeros(1, 16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="master must be float32, got torch.bfloat16"):
        triton_kernels.apply(grad.bfloat16(), votes, voters=1, lr=1e-3, weight_decay=0.0, master=grad.bfloat16())
    with pytest.raises(ValueError, match=r"planes must be \[P, C\], got shape \(16,\)"):
        triton_kernels.apply(grad, votes[0], voters=1, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="voters must be in .*got 0"):
        triton_kernels.apply(grad, votes, voters=0, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="vote_ema must be float32, got torch.bfloat16"):
        triton_kernels.apply(grad, votes, voters=1, lr=1e-3, weight_decay=0.0, vote_ema=grad.bfloat16(), beta=0.9)


# Compiles each kernel for real GPUs with Triton's bundled ptxas, in a process without
# the interpreter switch: CPU-only CI then still catches a kernel that would not build.
_COMPILE_SCRIPT = r'''
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from distlion.kernels import triton_kernels as T

def compile_ptx(kernel, signature, constexprs, arch):
    full = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    aligned = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t[0] == "*"}
    src = ASTSource(kernel, full, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": 4, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]

apply_sig = {"target_ptr": "*fp32", "param_ptr": "*i16", "ema_ptr": "*fp32", "planes_ptr": "*u8", "n_bytes": "i32",
             "voters": "fp32", "beta": "fp32", "one_minus_beta": "fp32", "correction": "fp32", "decay": "fp32",
             "neg_lr": "fp32"}
apply_flags = {"T_BF16": False, "P_BF16": True, "HAS_MASTER": True, "BYTES": 512}
cases = [
    (T._pack_signs_kernel, {"grad_ptr": "*i16", "mom_ptr": "*fp32", "out_ptr": "*u8", "n_bytes": "i32",
                            "beta1": "fp32", "one_minus_beta1": "fp32", "parity": "i32"},
     {"G_BF16": True, "M_BF16": False, "BYTES": 512}, [r"fma\.rn\.f32"]),
    (T._update_momentum_kernel, {"grad_ptr": "*fp16", "mom_ptr": "*i16", "numel": "i64", "beta2": "fp32",
                                 "one_minus_beta2": "fp32"}, {"G_BF16": False, "M_BF16": True, "BLOCK_SIZE": 4096},
     [r"fma\.rn\.f32"]),
    (T._nonfinite_kernel, {"bits_ptr": "*i16", "flag_ptr": "*u8", "numel": "i32"},
     {"EXPONENT": 0x7F80, "BLOCK_SIZE": 4096}, []),
    (T._majority_kernel, {"packed_ptr": "*i32", "casting_ptr": "*i32", "out_ptr": "*i32", "n_words": "i32"},
     {"N": 6, "P": 3, "HALF": 3, "BW": 1024}, []),
    (T._majority_kernel, {"packed_ptr": "*u8", "casting_ptr": "*u8", "out_ptr": "*u8", "n_words": "i32"},
     {"N": 1000, "P": 10, "HALF": 500, "BW": 1024}, []),
    (T._vote_counts_kernel, {"packed_ptr": "*i32", "out_ptr": "*i32", "n_words": "i32"},
     {"N": 5, "P": 3, "B": 5, "BW": 1024}, []),
    (T._apply_kernel, apply_sig, {**apply_flags, "MAJORITY": True, "SCALED": False, "B": 1}, [r"fma\.rn\.f32"]),
    (T._apply_kernel, apply_sig, {**apply_flags, "MAJORITY": True, "SCALED": True, "B": 1}, [r"fma\.rn\.f32"]),
    (T._apply_kernel, apply_sig, {**apply_flags, "MAJORITY": False, "SCALED": False, "B": 3},
     [r"fma\.rn\.f32", r"div\.rn\.f32"]),
    (T._apply_kernel, apply_sig, {**apply_flags, "MAJORITY": False, "SCALED": True, "B": 3},
     [r"fma\.rn\.f32", r"div\.rn\.f32"]),
]
for arch in (80, 90):
    for kernel, signature, constexprs, wanted in cases:
        ptx = compile_ptx(kernel, signature, constexprs, arch)
        missing = [w for w in wanted if not re.search(w, ptx)]
        assert not missing and "div.full" not in ptx, (kernel.__name__, arch, missing)
print("compiled", 2 * len(cases))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tests above already compile and run on the GPU")
def test_kernels_compile_for_gpus():
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # silences a deprecation warning; launches pass it anyway
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=110, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 20" in result.stdout
