"""The kernel contract: the ops ``DistLion.step()`` calls, declared once, in code.

Every backend module in ``distlion.kernels.BACKENDS`` defines each method of
``Kernels`` as a module-level function with exactly the declared parameters
(``check_backend`` verifies it; ``kernels_for`` returns only modules that pass), and
the tests walk every backend over ``OPS``. The arithmetic is that of
docs/design.md §1; the bits must equal those of the reference backend.

Layout shared by every op: a bucket has d coordinates, d a multiple of 64; packed
signs are uint8, bit j of byte k is coordinate 8k + j, and a set bit means +1. Float
arithmetic is fp32 whatever the tensors' dtypes, with torch's rounding: a Python
scalar is rounded to fp32 once, and ``a.add(b, alpha=k)`` is one fma.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Protocol

from torch import Tensor


class Kernels(Protocol):
    """What a kernel backend provides: the module-level functions below."""

    def pack_grads_and_momentum(self, grads: list[Tensor | None], views: list[Tensor], momentum: Tensor,
                                out: Tensor, momentum_out: Tensor, *, beta1: float, beta2: float,
                                parity: int) -> Tensor:
        """``pack_signs_and_momentum`` of a bucket whose gradient is given per parameter.

        ``grads`` are the parameters' gradients (None: zero) and ``views`` their views of
        ``momentum_out``, shaped like the gradients; coordinates outside the views hold
        zero, as bucket padding does. A backend may gather the gradients into the views
        first or read them in place.
        """

    def pack_signs_and_momentum(self, grad: Tensor, momentum: Tensor, out: Tensor, momentum_out: Tensor, *,
                                beta1: float, beta2: float, parity: int) -> Tensor:
        """``pack_signs_and_check``, and momentum_out <- what ``update_momentum`` would write.

        Both come from the same read of grad and momentum: ``momentum_out`` may be ``grad``
        itself (the optimizer then swaps the two buffers once the step is agreed), and
        ``momentum`` is never written.
        """

    def pack_signs_and_check(self, grad: Tensor, momentum: Tensor, out: Tensor, *, beta1: float,
                             parity: int) -> Tensor:
        """Pack the signs of c into ``out`` [d/8] and return whether grad holds an inf or a nan.

        c = fp32(momentum)*beta1 + fp32(grad)*(1-beta1), rounded as torch's ``mul`` then
        ``add(alpha=)``. A coordinate with c == 0 votes + where (index + parity) is even and
        - otherwise (the zero rule of docs/design.md §1). The flag is a 0-dim bool tensor on
        grad's device (no host sync needed to produce it).
        """

    def update_momentum(self, grad: Tensor, momentum: Tensor, *, beta2: float) -> None:
        """Set momentum <- fp32(momentum)*beta2 + fp32(grad)*(1-beta2), stored in momentum's dtype."""

    def majority_vote(self, packed: Tensor, out: Tensor, *, casting_rank: int) -> None:
        """Write the bitwise majority of the N rows of ``packed`` [N, C] into ``out`` [C].

        A bit is set where more than N/2 rows have it set; on a tie (N even, exactly N/2)
        the bit of row ``casting_rank`` decides.
        """

    def vote_counts(self, packed: Tensor, out: Tensor) -> None:
        """Write the per-coordinate count of set bits of ``packed`` [N, C] as bit-planes into ``out``.

        ``out`` is uint8 [B, C] with B >= ceil(log2(N + 1)); plane i holds bit i of each count.
        """

    def apply(self, param: Tensor, planes: Tensor, *, voters: int, lr: float, weight_decay: float,
              master: Tensor | None = None, vote_ema: Tensor | None = None, beta: float = 0.0,
              step: int = 1) -> None:
        """Apply the voted step to ``param`` (through its fp32 ``master`` when given).

        ``planes`` is uint8 [P, C], the bit-planes of k, the count of positive votes among
        ``voters`` voters (bit i of k in plane i); a majority vote is one plane with
        ``voters=1``. The direction is s = fp32(2k - N) / N, divided as
        ``arithmetic.average_steps`` divides. Without ``vote_ema``:

            x <- x*(1 - lr*weight_decay) + (-lr)*s

        With ``vote_ema`` (fp32, updated in place), the step is ``arithmetic.scaled_step``:
        vote_ema <- vote_ema*beta + s*(1-beta), then s*h*h with
        h = vote_ema*bias_correction(beta, step). x is ``master`` when given, then
        param <- master in param's dtype; else x is param, computed in fp32.
        """


OPS: tuple[str, ...] = tuple(name for name, value in vars(Kernels).items()
                             if inspect.isfunction(value) and not name.startswith("_"))


def signature(op: str) -> inspect.Signature:
    """Return the declared signature of ``op``, as a module-level function has it (no ``self``)."""
    declared = inspect.signature(getattr(Kernels, op))
    return declared.replace(parameters=list(declared.parameters.values())[1:])


def _shape(sig: inspect.Signature) -> list[tuple]:
    """Names, kinds and defaults of a signature's parameters: what a call depends on."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def check_backend(module: ModuleType) -> ModuleType:
    """Return ``module`` if it defines every op of the contract with its signature; raise TypeError if not."""
    problems = []
    for op in OPS:
        function = getattr(module, op, None)
        if function is None:
            problems.append(f"{op} is missing")
        elif _shape(inspect.signature(function)) != _shape(signature(op)):
            problems.append(f"{op}{inspect.signature(function)} should be {op}{signature(op)}")
    if problems:
        raise TypeError(f"kernel backend {module.__name__} breaks the contract of distlion.kernels.contract: "
                        + "; ".join(problems))
    return module
