"""Sign exchanges: move packed sign bits between ranks and return the voted bits.

Every exchange takes a bucket through three calls, in bucket order at each stage:

- ``start`` takes this rank's packed bits of the bucket and its ``FLAG_BYTES`` header
  bytes (flags and a digest, ``distlion.agreement``) and launches the first collective
  without waiting, so the caller packs the next bucket while these bytes travel.
- ``vote`` waits for it, calls the vote on the packed bits gathered (the vote itself
  is a kernel, passed in, so this module only moves bytes), launches whatever
  collective remains without waiting, and returns every voter's header. The headers
  ride in the first collective, so agreeing on a skip costs no extra round trip, and
  every rank knows whether to skip the step before any voted bit has come back.
- ``finish`` waits for the rest and returns the voted bit-planes of the whole bucket,
  so the caller applies bucket i while the votes of bucket i+1 travel.

- ``TwoPhaseExchange``: all_to_all of the packed signs, each rank votes on its 1/N
  chunk, all_gather of the voted chunks. ~2(N-1)/N bytes per 8 coordinates, flat in N.
- ``AllGatherExchange``: all_gather of every rank's packed signs, every rank votes on
  the whole bucket. (N-1) bytes per 8 coordinates; one collective, best for N <= 2.
- ``LocalExchange``: world size 1, no collective.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.comm.flat import all_gather_flat, wait_for
from distlion.comm.stats import CommStats

# Bytes appended to each message for the header (flags and a digest): 8 keep int64 alignment.
FLAG_BYTES = 8

VoteFn = Callable[[Tensor, Tensor], None]  # (packed [N, C], out planes [P, C]) -> None


class SignExchange(Protocol):
    stats: CommStats
    voters: int  # the voters of the step under way (a quorum's may change between steps)

    def start(self, bucket: int, local_bits: Tensor, header: Tensor) -> None:
        """Launch the exchange of ``bucket`` with this rank's ``header`` (uint8 [FLAG_BYTES]); leave
        ``local_bits`` unchanged until ``vote``."""
        ...

    def vote(self, bucket: int, vote: VoteFn) -> Tensor:
        """Vote on ``bucket``'s gathered bits; return every voter's header, uint8 [voters, FLAG_BYTES]."""
        ...

    def finish(self, bucket: int) -> Tensor:
        """Return ``bucket``'s voted planes [P, nbytes]; call once per ``vote``, also on a skipped step."""
        ...


def _transport_device(group, device: torch.device) -> torch.device:
    """Return where collective buffers live: gloo moves CPU tensors, so CUDA data is staged."""
    if device.type == "cuda" and dist.get_backend(group) == dist.Backend.GLOO:
        return torch.device("cpu")
    return device


class LocalExchange:
    """World size 1: the vote of one rank, no collective, no bytes."""

    voters = 1

    def __init__(self, bucket_bytes: list[int], planes: int, device: torch.device, stats: CommStats):
        self.stats = stats
        self._voted = [torch.empty(planes, n, dtype=torch.uint8, device=device) for n in bucket_bytes]
        self._started: dict[int, tuple[Tensor, Tensor]] = {}

    def start(self, bucket, local_bits, header):
        self._started[bucket] = (local_bits, header)

    def vote(self, bucket, vote):
        local_bits, header = self._started.pop(bucket)
        vote(local_bits.view(1, -1), self._voted[bucket])
        return header.view(1, -1)

    def finish(self, bucket):
        return self._voted[bucket]


class _Collective:
    """Shared plumbing: the process group, buffers allocated once, byte counting."""

    def __init__(self, group, bucket_bytes: list[int], planes: int, device: torch.device, stats: CommStats,
                 timeout=None):
        self.group = group
        self.timeout = timeout
        self.world_size = dist.get_world_size(group)
        self.planes = planes
        self.device = device
        self.transport = _transport_device(group, device)
        self.stats = stats
        self._voted = [torch.empty(planes, n, dtype=torch.uint8, device=device) for n in bucket_bytes]
        self._pending: dict[int, Any] = {}  # bucket -> the work handle of the collective in flight

    @property
    def voters(self) -> int:
        return self.world_size

    def _wait(self, bucket: int) -> None:
        wait_for(self._pending.pop(bucket), f"the sign exchange of bucket {bucket}", self.timeout)

    def _count(self, sent: int, received: int) -> None:
        self.stats.count_inter_node(sent=sent, received=received)


class TwoPhaseExchange(_Collective):
    """all_to_all the packed signs, vote on the owned chunk, all_gather the votes."""

    def __init__(self, group, bucket_bytes, planes, device, stats, timeout=None):
        super().__init__(group, bucket_bytes, planes, device, stats, timeout)
        n, t = self.world_size, self.transport
        self._send, self._recv, self._packed, self._chunk_vote, self._gathered = [], [], [], [], []
        for nbytes in bucket_bytes:
            chunk = nbytes // n
            self._send.append(torch.zeros(n, chunk + FLAG_BYTES, dtype=torch.uint8, device=t))
            self._recv.append(torch.empty(n, chunk + FLAG_BYTES, dtype=torch.uint8, device=t))
            self._packed.append(torch.empty(n, chunk, dtype=torch.uint8, device=t))
            self._chunk_vote.append(torch.empty(planes, chunk, dtype=torch.uint8, device=t))
            self._gathered.append(torch.empty(n, planes, chunk, dtype=torch.uint8, device=t))

    def start(self, bucket, local_bits, header):
        n = self.world_size
        send, recv = self._send[bucket], self._recv[bucket]
        chunk = self._packed[bucket].shape[1]
        send[:, :chunk].copy_(local_bits.view(n, chunk))
        send[:, chunk:].copy_(header)
        self._pending[bucket] = dist.all_to_all_single(recv, send, group=self.group, async_op=True)

    def vote(self, bucket, vote):
        recv, packed = self._recv[bucket], self._packed[bucket]
        chunk = packed.shape[1]
        self._wait(bucket)
        packed.copy_(recv[:, :chunk])
        vote(packed, self._chunk_vote[bucket])
        self._pending[bucket] = all_gather_flat(self._gathered[bucket], self._chunk_vote[bucket], self.group,
                                                 async_op=True)
        return recv[:, chunk:].to(self.device)

    def finish(self, bucket):
        n = self.world_size
        chunk = self._packed[bucket].shape[1]
        self._wait(bucket)
        voted = self._voted[bucket]
        # [N, P, C] -> [P, N*C]: plane p of the bucket is the N chunks of plane p in rank order
        voted.view(self.planes, n, chunk).copy_(self._gathered[bucket].transpose(0, 1))
        self._count(sent=(n - 1) * (chunk + FLAG_BYTES + self.planes * chunk),
                    received=(n - 1) * (chunk + FLAG_BYTES + self.planes * chunk))
        return voted


class AllGatherExchange(_Collective):
    """all_gather every rank's packed signs; every rank votes on the whole bucket."""

    def __init__(self, group, bucket_bytes, planes, device, stats, timeout=None):
        super().__init__(group, bucket_bytes, planes, device, stats, timeout)
        n, t = self.world_size, self.transport
        self._send, self._gathered, self._packed = [], [], []
        # the vote is written where the packed signs are; staged CUDA data comes back after
        self._vote_out = self._voted if t == device else [torch.empty_like(v, device=t) for v in self._voted]
        for nbytes in bucket_bytes:
            self._send.append(torch.zeros(nbytes + FLAG_BYTES, dtype=torch.uint8, device=t))
            self._gathered.append(torch.empty(n, nbytes + FLAG_BYTES, dtype=torch.uint8, device=t))
            self._packed.append(torch.empty(n, nbytes, dtype=torch.uint8, device=t))

    def start(self, bucket, local_bits, header):
        send = self._send[bucket]
        nbytes = self._packed[bucket].shape[1]
        send[:nbytes].copy_(local_bits)
        send[nbytes:].copy_(header)
        self._pending[bucket] = all_gather_flat(self._gathered[bucket], send, self.group, async_op=True)

    def vote(self, bucket, vote):
        n = self.world_size
        gathered, packed = self._gathered[bucket], self._packed[bucket]
        nbytes = packed.shape[1]
        self._wait(bucket)
        packed.copy_(gathered[:, :nbytes])
        voted = self._voted[bucket]
        vote(packed, self._vote_out[bucket])
        if self._vote_out[bucket] is not voted:
            voted.copy_(self._vote_out[bucket])
        self._count(sent=(n - 1) * (nbytes + FLAG_BYTES), received=(n - 1) * (nbytes + FLAG_BYTES))
        return gathered[:, nbytes:].to(self.device)

    def finish(self, bucket):
        return self._voted[bucket]  # one collective: the votes were complete in ``vote``


EXCHANGES = {"two_phase": TwoPhaseExchange, "all_gather": AllGatherExchange}


def choose_exchange(name: str, world_size: int) -> str:
    """Resolve ``"auto"``: all-gather for N <= 2 (one collective), two-phase above."""
    if name != "auto":
        return name
    return "all_gather" if world_size <= 2 else "two_phase"


def make_exchange(name: str, group, bucket_bytes: list[int], planes: int, device: torch.device,
                  stats: CommStats, timeout=None) -> SignExchange:
    """Build the exchange ``name`` ("auto", "two_phase" or "all_gather") for ``group``.

    ``timeout`` (a timedelta) bounds every wait; None leaves it to the process group.
    """
    world_size = dist.get_world_size(group) if group is not None else 1
    if world_size == 1:
        return LocalExchange(bucket_bytes, planes, device, stats)
    return EXCHANGES[choose_exchange(name, world_size)](group, bucket_bytes, planes, device, stats, timeout)
