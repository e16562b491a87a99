"""Flat buckets: where every parameter lives in the padded flat buffers (the plan a layout allocates).

Built once, at construction, from the param groups. A bucket never spans two param
groups, dtypes or devices, so one lr / weight decay / betas applies to a whole bucket
and one collective moves it. Buckets are padded to a multiple of ``64 * world_size``
coordinates: each rank then owns whole int64 words of the packed signs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

COORDS_PER_WORD = 64  # one int64 word of packed signs


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket."""

    param_index: int  # position in the optimizer's flattened parameter list
    offset: int       # first coordinate in the bucket
    numel: int
    shape: torch.Size


@dataclass
class Bucket:
    """Parameters of one group, dtype and device, laid out contiguously."""

    group_index: int
    dtype: torch.dtype
    device: torch.device
    slots: list[Slot] = field(default_factory=list)
    numel: int = 0         # coordinates that belong to parameters
    padded_numel: int = 0  # numel rounded up to the padding multiple

    def add(self, param_index: int, param: Tensor) -> None:
        self.slots.append(Slot(param_index, self.numel, param.numel(), param.shape))
        self.numel += param.numel()


@dataclass
class BucketLayout:
    """The buckets of all param groups, plus a signature that must agree on every rank."""

    buckets: list[Bucket]
    world_size: int
    num_params: int

    @property
    def numel(self) -> int:
        return sum(bucket.numel for bucket in self.buckets)

    @property
    def padded_numel(self) -> int:
        return sum(bucket.padded_numel for bucket in self.buckets)

    def signature(self) -> str:
        """Return a digest of everything that must match between ranks and checkpoints."""
        digest = hashlib.sha256(f"world={self.world_size}".encode())
        for bucket in self.buckets:
            digest.update(f"|g{bucket.group_index}:{bucket.dtype}:{bucket.padded_numel}".encode())
            for slot in bucket.slots:
                digest.update(f"/{slot.param_index}:{tuple(slot.shape)}".encode())
        return digest.hexdigest()[:32]

    def describe(self) -> str:
        """Return a short human-readable summary used in error messages."""
        return (f"{self.num_params} parameters, {self.numel:,} elements in {len(self.buckets)} bucket(s), "
                f"layout {self.signature()[:12]}")


def plan_to_json(plan: BucketLayout) -> dict:
    """The plan as plain values (a checkpoint's manifest keeps it, so a tool can re-split the state offline)."""
    return {"num_params": plan.num_params, "buckets": [
        {"group": b.group_index, "dtype": str(b.dtype).removeprefix("torch."), "numel": b.numel,
         "slots": [[s.param_index, s.offset, s.numel, list(s.shape)] for s in b.slots]} for b in plan.buckets]}


def plan_from_json(data: dict, world_size: int) -> BucketLayout:
    """``plan_to_json``'s plan, padded for ``world_size`` ranks (as ``build_layout`` pads it)."""
    buckets = []
    for entry in data["buckets"]:
        bucket = Bucket(entry["group"], getattr(torch, entry["dtype"]), torch.device("cpu"))
        bucket.slots = [Slot(index, offset, numel, torch.Size(shape)) for index, offset, numel, shape in entry["slots"]]
        bucket.numel = entry["numel"]
        buckets.append(bucket)
    return _padded(buckets, world_size, data["num_params"])


def build_layout(param_groups: list[dict], world_size: int, bucket_cap_mb: float) -> BucketLayout:
    """Lay out every parameter with ``requires_grad`` into padded buckets, in group order.

    Args:
        param_groups: the optimizer's param groups (lists of tensors under "params").
        world_size: ranks that exchange signs; buckets are padded to 64 * world_size.
        bucket_cap_mb: soft cap on a bucket's size in MiB of fp32; a larger tensor gets
            a bucket of its own.
    """
    cap = max(int(bucket_cap_mb * 2**20 / 4), 1)
    buckets: list[Bucket] = []
    param_index = 0
    for group_index, group in enumerate(param_groups):
        open_buckets: dict[tuple[torch.dtype, torch.device], Bucket] = {}
        for param in group["params"]:
            index, param_index = param_index, param_index + 1
            if not param.requires_grad:
                continue
            key = (param.dtype, param.device)
            bucket = open_buckets.get(key)
            if bucket is None or (bucket.slots and bucket.numel + param.numel() > cap):
                bucket = Bucket(group_index, param.dtype, param.device)
                open_buckets[key] = bucket
                buckets.append(bucket)
            bucket.add(index, param)
    return _padded(buckets, world_size, param_index)


def _padded(buckets: list[Bucket], world_size: int, num_params: int) -> BucketLayout:
    """Pad every bucket to a multiple of ``64 * world_size`` coordinates."""
    multiple = COORDS_PER_WORD * world_size
    for bucket in buckets:
        bucket.padded_numel = -(-max(bucket.numel, 1) // multiple) * multiple
    return BucketLayout(buckets, world_size, num_params)


def slot_views(flat: Tensor, bucket: Bucket) -> list[Tensor]:
    """Return views of ``flat`` shaped like each parameter of ``bucket``."""
    return [flat[slot.offset:slot.offset + slot.numel].view(slot.shape) for slot in bucket.slots]


def chunk_ranges(bucket: Bucket, chunk_numel: int, part: int) -> list[tuple[int, int, int]]:
    """Per parameter of ``bucket``: (start, end) of its part in chunk ``part`` (of ``chunk_numel`` coordinates),
    and where that part starts in the parameter (an empty part for a parameter outside the chunk)."""
    lo = part * chunk_numel
    ranges = []
    for slot in bucket.slots:
        start, end = max(slot.offset, lo), min(slot.offset + slot.numel, lo + chunk_numel)
        ranges.append((start - lo, max(start, end) - lo, start - slot.offset))
    return ranges
