"""Byte counters of the sign exchange, cumulative for this rank."""

from __future__ import annotations

from dataclasses import asdict, dataclass


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * (world_size - 1) * nbytes // world_size


@dataclass
class CommStats:
    """What this rank put into and took out of its collectives, cumulative.

    Attributes:
        steps: optimizer steps that exchanged signs (skipped steps included).
        skipped_steps: steps skipped because some rank had a non-finite gradient.
        bytes_sent: payload bytes this rank sent to other ranks.
        bytes_received: payload bytes this rank received from other ranks.
        allreduce_fp32_bytes: what a ring all-reduce of the same parameters' fp32
            gradients would have sent from this rank: 2*(N-1)/N * 4 bytes per parameter.
    """

    steps: int = 0
    skipped_steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    allreduce_fp32_bytes: int = 0

    def reset(self) -> None:
        """Zero every counter."""
        for key in ("steps", "skipped_steps", "bytes_sent", "bytes_received", "allreduce_fp32_bytes"):
            setattr(self, key, 0)

    @property
    def bytes_sent_per_step(self) -> float:
        return self.bytes_sent / self.steps if self.steps else 0.0

    @property
    def compression(self) -> float:
        """fp32 all-reduce bytes over DistLion bytes sent (0.0 before any exchange)."""
        return self.allreduce_fp32_bytes / self.bytes_sent if self.bytes_sent else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes_sent_per_step": self.bytes_sent_per_step,
                "compression": self.compression}
