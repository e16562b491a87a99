"""Byte counters of DistLion's collectives, cumulative for this rank, by link class."""

from __future__ import annotations

from dataclasses import asdict, dataclass


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather).

    It is also what a ring over ranks ordered by node sends across one node's boundary:
    the ring leaves each node once.
    """
    return 2 * (world_size - 1) * nbytes // world_size


@dataclass
class CommStats:
    """What this rank put into and took out of its collectives, cumulative.

    Two link classes: inter-node (the 1-bit vote between nodes) and intra-node (the
    gradient reduce-scatter and parameter all-gather inside a node of ``ranks_per_node``
    ranks; none when it is 1, where every rank is a node of its own).

    Attributes:
        steps: optimizer steps that exchanged signs (skipped steps included).
        skipped_steps: steps skipped because some rank had a non-finite gradient.
        uncommitted_steps: steps a quorum (``distlion.torchft``) did not commit because a voter
            failed during them; nothing was applied (counted in ``steps``).
        bytes_sent, bytes_received: payload bytes to and from other ranks, both classes.
        inter_node_bytes_sent, inter_node_bytes_received: the vote's payload.
        intra_node_bytes_sent, intra_node_bytes_received: the node's payload.
        allreduce_fp32_bytes: what this rank would send in a ring all-reduce of the same
            parameters' fp32 gradients over all N ranks: 2*(N-1)/N * 4 bytes per parameter.
        ranks_per_node: G, the ranks of a node (they share one vote).
        gradients_already_averaged: True once every voter packed identical signs on the
            first steps (``distlion.averaged``): something all-reduced the gradients before
            DistLion, so the saving is not real and ``compression`` is 0.0.
    """

    steps: int = 0
    skipped_steps: int = 0
    uncommitted_steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    inter_node_bytes_sent: int = 0
    inter_node_bytes_received: int = 0
    intra_node_bytes_sent: int = 0
    intra_node_bytes_received: int = 0
    allreduce_fp32_bytes: int = 0
    ranks_per_node: int = 1
    gradients_already_averaged: bool = False

    # The figures a training log carries (distlion.integrations.common.comm_metrics).
    LOGGED = ("steps", "skipped_steps", "bytes_sent", "bytes_sent_per_step", "allreduce_fp32_bytes", "compression")
    COUNTERS = ("steps", "skipped_steps", "uncommitted_steps", "bytes_sent", "bytes_received",
                "inter_node_bytes_sent", "inter_node_bytes_received", "intra_node_bytes_sent",
                "intra_node_bytes_received", "allreduce_fp32_bytes")

    def reset(self) -> None:
        """Zero every counter."""
        for key in self.COUNTERS:
            setattr(self, key, 0)

    def count_inter_node(self, *, sent: int, received: int) -> None:
        self.inter_node_bytes_sent += sent
        self.inter_node_bytes_received += received
        self.bytes_sent += sent
        self.bytes_received += received

    def count_intra_node(self, *, sent: int, received: int) -> None:
        self.intra_node_bytes_sent += sent
        self.intra_node_bytes_received += received
        self.bytes_sent += sent
        self.bytes_received += received

    @property
    def bytes_sent_per_step(self) -> float:
        return self.bytes_sent / self.steps if self.steps else 0.0

    @property
    def allreduce_fp32_node_bytes(self) -> int:
        """What that ring (ranks in node order) sends across one node's boundary, per node: it leaves
        each node once, so the same bytes as one rank sends, 2*(N-1)/N * 4 per parameter."""
        return self.allreduce_fp32_bytes

    @property
    def inter_node_bytes_per_step(self) -> float:
        """What this node sends to other nodes per step (its ``ranks_per_node`` ranks together)."""
        return self.ranks_per_node * self.inter_node_bytes_sent / self.steps if self.steps else 0.0

    @property
    def compression(self) -> float:
        """Bytes DDP's fp32 ring sends across a node's boundary over the bytes this node's vote sends
        to other nodes (every rank of a node sends the same share); 0.0 before any exchange, and
        when the gradients were averaged before DistLion (no saving)."""
        sent = self.ranks_per_node * self.inter_node_bytes_sent
        if self.gradients_already_averaged:
            return 0.0  # the all-reduce ran anyway
        return self.allreduce_fp32_node_bytes / sent if sent else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "allreduce_fp32_node_bytes": self.allreduce_fp32_node_bytes,
                "bytes_sent_per_step": self.bytes_sent_per_step,
                "inter_node_bytes_per_step": self.inter_node_bytes_per_step, "compression": self.compression}

    def logged(self, prefix: str = "distlion/") -> dict[str, float]:
        """The ``LOGGED`` figures, named ``prefix + field``, for a training log."""
        stats = self.as_dict()
        return {f"{prefix}{key}": stats[key] for key in self.LOGGED}

    def load(self, saved: dict) -> None:
        """Restore the counters of ``as_dict()`` (a missing one is zero)."""
        for key in self.COUNTERS:
            setattr(self, key, int(saved.get(key, 0)))
