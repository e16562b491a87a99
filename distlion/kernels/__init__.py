"""Pure tensor kernels of DistLion: local step + pack, vote, unpack + apply.

No process group is involved here; every function works on flat bucket tensors.
Four implementations share one contract, and ``kernels_for(device)`` picks one:

- ``reference``: plain and obvious, the oracle of the tests;
- ``cpu_native``: C compiled on first use, one pass per kernel, the default on CPU
  (it hands what it does not cover, and everything when no C compiler is found, to
  ``torch_fast``);
- ``torch_fast``: chunked torch ops on packed int64 words, for any device;
- ``triton_kernels``: fused Triton kernels, the default for CUDA tensors when Triton
  is installed.

The contract (d is a multiple of 64; bit j of byte k is coordinate 8k + j; a set bit
means +1):

``pack_signs(grad, momentum, out, *, beta1, parity)``
    out[k] <- packed bits of sign(c), c = fp32(momentum)*beta1 + fp32(grad)*(1-beta1)
    (rounded as torch's ``mul`` then ``add(alpha=)``, i.e. one fma). A coordinate with
    c == 0 votes + where (index + parity) is even, - otherwise (the zero rule).
``pack_signs_and_check(grad, momentum, out, *, beta1, parity) -> Tensor``
    ``pack_signs``, returning ``nonfinite(grad)``: the C kernels check while they pack.
``pack_signs_and_momentum(grad, momentum, out, momentum_out, *, beta1, beta2, parity) -> Tensor``
    ``pack_signs_and_check``, and momentum_out <- the momentum ``update_momentum`` would
    write, from the same read of grad and momentum; ``momentum_out`` may be ``grad``
    itself (the optimizer then swaps the two buffers once the step is agreed).
``pack_grads_and_momentum(grads, views, momentum, out, momentum_out, *, beta1, beta2, parity) -> Tensor``
    ``pack_signs_and_momentum`` of the bucket's gradient, given as the parameters'
    gradients (None: zero) and their ``views`` of ``momentum_out`` (shaped like the
    gradients; coordinates outside the views must hold zero, as bucket padding does):
    the plain versions gather the gradients into those views first, the C kernels read
    them in place.
``update_momentum(grad, momentum, *, beta2)``
    momentum <- fp32(momentum)*beta2 + fp32(grad)*(1-beta2), stored in momentum's dtype.
``nonfinite(grad) -> Tensor``
    0-dim bool tensor, True when grad holds an inf or nan (no host sync).
``majority_vote(packed, out, *, casting_rank)``
    packed: uint8 [N, C]; out: uint8 [C]. A bit is set where more than N/2 rows have
    it set; on a tie (N even, exactly N/2) the bit of row ``casting_rank`` decides.
``vote_counts(packed, out)``
    out: uint8 [B, C], B >= ceil(log2(N+1)); plane i holds bit i of the per-coordinate
    count of set bits.
``apply_majority(param, vote, *, lr, weight_decay, master=None)``
    x <- x*(1 - lr*weight_decay) + (-lr)*s, s = +1 for a set bit else -1, where x is
    ``master`` (fp32 copy) when given, then param <- x in param's dtype.
``apply_average(param, counts, *, world_size, lr, weight_decay, master=None)``
    as above with s = fp32(2*count - N) / N.
``apply_scaled(param, counts, vote_ema, *, voters, beta, step, lr, weight_decay, master=None)``
    as ``apply_average`` with N = ``voters`` (a majority vote is ``counts`` of one plane
    with ``voters=1``), but first vote_ema <- fp32(vote_ema)*beta + s*(1-beta) (fp32), and
    the step is s*h*h with h = vote_ema * (1/(1 - beta**step)): coordinates whose vote
    keeps its sign step by up to the full lr, those whose vote flips by much less.
"""

from __future__ import annotations

from types import ModuleType

import torch

from distlion.kernels import cpu_native, reference, torch_fast

__all__ = ["cpu_native", "kernels_for", "reference", "torch_fast"]


def kernels_for(device: torch.device | str) -> ModuleType:
    """Return the fastest kernel module for tensors on ``device``."""
    if torch.device(device).type == "cuda":
        try:
            from distlion.kernels import triton_kernels
        except ImportError:  # Triton missing or unusable: torch ops work on any device
            return torch_fast
        return triton_kernels
    if torch.device(device).type == "cpu" and cpu_native.available():
        return cpu_native
    return torch_fast
