"""Find the DistLion inside the optimizer wrappers of Accelerate, DeepSpeed and torch."""

from __future__ import annotations

from typing import Any

from distlion.optim import DistLion


def unwrap(obj: Any) -> DistLion | None:
    """Return the DistLion that ``obj`` is or wraps, or None when there is none.

    Looks through optimizer wrappers (objects with ``param_groups`` that keep the inner
    optimizer as ``.optimizer``: Accelerate's ``AcceleratedOptimizer``, DeepSpeed's
    ``FP16_UnfusedOptimizer`` and ``BF16_Optimizer``) and DeepSpeed engines (the client
    optimizer is ``engine.basic_optimizer``). A model or an LR scheduler is not a
    wrapper: a scheduler's ``.optimizer`` is not followed.

    Example::

        engine, optimizer, _, _ = distlion.deepspeed.initialize(...)
        distlion.unwrap(engine).comm_stats.bytes_sent
    """
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, DistLion):
            return obj
        seen.add(id(obj))
        inner = getattr(obj, "basic_optimizer", None)  # a DeepSpeed engine
        if inner is None and hasattr(obj, "param_groups"):  # an optimizer wrapper
            inner = getattr(obj, "optimizer", None)
        obj = inner
    return None
