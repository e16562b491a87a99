"""The per-step agreement: what every rank must hold alike, checked each step in bytes already sent.

Every sign message carries ``HEADER_BYTES`` = 8 bytes behind the packed signs
(``distlion.comm.exchange``)::

    byte 0      flags: NONFINITE (a non-finite gradient here, or GradScaler's found_inf),
                RELAYOUT (this rank's parameters changed shape, dtype, order or requires_grad)
    bytes 1-7   a digest of what must be equal on every voter at this step: the step, every
                param group's lr, betas, weight_decay and vote_ema_beta (hashed by value), and
                the layout's signature (shapes, dtypes, groups)

Every voter receives every other voter's header with the signs, so each voter sees a
difference at once. The ranks that share a vote (a node's, FSDP's shard group) already
agree on the skip with one tiny all-reduce (MAX); ``summary`` packs the flags and the
digest of the step's settings (as d and -d, so MAX gives both the largest and the
smallest; without the layout, as FSDP's shard ranks lay out different shards) into that
one tensor. No collective is added; the node's agreement grows from 1 byte to
``SUMMARY_BYTES``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch
from torch import Tensor

HEADER_BYTES = 8
DIGEST_BYTES = HEADER_BYTES - 1
NONFINITE, RELAYOUT = 1, 2
# summary: [non-finite anywhere, re-layout asked anywhere, digests differ, digest, -digest]
SUMMARY = ("nonfinite", "relayout", "differs", "digest", "negated_digest")
SUMMARY_BYTES = 8 * len(SUMMARY)


def by_value(value: Any) -> Any:
    """``value`` with every number as an exact float (a tensor's ``repr`` rounds: tensor(0.01003) prints 0.0100)."""
    if isinstance(value, Tensor):
        return by_value(value.detach().cpu().double().tolist())
    if isinstance(value, (list, tuple)):
        return tuple(by_value(item) for item in value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return struct.pack("<d", float(value)).hex()  # every bit of the double
    return repr(value)


def step_settings(step: int, param_groups: list[dict]) -> dict[str, Any]:
    """What every rank must hold alike at ``step``, by name (the names appear in the error). The layout's
    signature is added for the voters only: FSDP's shard ranks lay out different shards."""
    settings: dict[str, Any] = {"step": step}
    for index, group in enumerate(param_groups):
        for key in ("lr", "betas", "weight_decay", "vote_ema_beta"):
            settings[f"param group {index} {key}"] = group[key]
    return settings


def digest(settings: dict[str, Any]) -> int:
    """A 56-bit digest of ``settings``, by value."""
    text = repr([(name, by_value(value)) for name, value in settings.items()]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=DIGEST_BYTES).digest(), "little")


def header(flags: Tensor, step_digest: int) -> Tensor:
    """The 8 header bytes of one message: ``flags`` (0-dim uint8 on the signs' device) and the digest."""
    out = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=flags.device)
    out[1:].copy_(torch.tensor(list(step_digest.to_bytes(DIGEST_BYTES, "little")), dtype=torch.uint8))
    out[0] = flags
    return out


def summary(rows: list[Tensor], step_digest: int) -> Tensor:
    """Reduce every bucket's received headers ([voters, 8] each) to ``SUMMARY`` (int64, on the rows' device);
    ``step_digest`` is the digest the ranks that share a vote (a node, FSDP's shard group) compare."""
    flags = torch.stack([received[:, 0] for received in rows])
    first = rows[0][:, 1:]
    signed = step_digest - (1 << 56) if step_digest >= 1 << 55 else step_digest  # two's complement in 56 bits
    values = [((flags & NONFINITE) > 0).any(), ((flags & RELAYOUT) > 0).any(), (first != first[:1]).any()]
    return torch.cat([torch.stack(values).long(), torch.tensor([signed, -signed], device=flags.device)])


def flagged(rows: list[Tensor], bit: int) -> list[int]:
    """The voters (places in the vote group) whose header set ``bit`` in any bucket."""
    marked = torch.zeros(rows[0].shape[0], dtype=torch.bool, device=rows[0].device)
    for received in rows:
        marked |= (received[:, 0] & bit) > 0
    return marked.nonzero().flatten().tolist()
