"""distlion in training frameworks: siblings over one shared module.

    common.py        unwrap, the local-gradient DDP hook, the agreed skip, file names, metric
                     keys, fail_together, the failure types: written once
    accelerate.py    distlion.accelerate.prepare (DDP, FSDP2, DeepSpeed plugins)
    deepspeed.py     "type": "DistLion" in a DeepSpeed config (import registers it)
    transformers.py  DistLionTrainer
    lightning.py     strategy="distlion" (import registers it)
    dcp.py           DistLion's state in torch.distributed.checkpoint, for FSDP2
    torchrun.py      distlion.save / distlion.load for plain torchrun scripts

The rule: a sibling imports ``common`` (and the core: ``distlion.optim``, ``distlion.comm``,
...), never another sibling, and ``common`` imports no sibling. Users reach them by their
short names: ``distlion.accelerate`` is ``distlion.integrations.accelerate`` (likewise
``deepspeed``, ``transformers``, ``lightning``, ``dcp``), and ``distlion.save`` /
``distlion.load`` are ``torchrun``'s.

One link is not code: Accelerate's DeepSpeed plugin and Trainer's ``deepspeed=`` build
their engine through ``deepspeed.initialize``, which takes DistLion only once the deepspeed
integration is imported. They ask for that by name (``activate("deepspeed")``), as a
script's own ``import distlion.deepspeed`` would.
"""

from __future__ import annotations

import importlib

INTEGRATIONS = ("accelerate", "deepspeed", "transformers", "lightning", "dcp", "torchrun")


def activate(name: str) -> None:
    """Import the integration ``name`` for what its import registers (``"deepspeed"``: ``deepspeed.initialize``
    takes DistLion; ``"lightning"``: ``strategy="distlion"``)."""
    if name not in INTEGRATIONS:
        raise ValueError(f"Invalid integration {name!r}; use one of {INTEGRATIONS}")
    importlib.import_module(f"{__name__}.{name}")
