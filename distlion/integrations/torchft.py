"""DistLion on torchft: the vote of whichever replica groups are alive, step by step.

torchft (``pip install torchft``; pytorch/torchft) keeps a quorum of replica groups: a
Lighthouse server tracks them, a ``Manager`` in every rank reconfigures one process group
across the groups whenever the quorum changes, a group that joins or falls behind gets
the live state from a peer, and ``should_commit`` tells every group whether a step may be
applied. Here each replica group is one DistLion voter:

- a replica group is one rank (a group of several ranks voting as one node is not
  supported yet: its node reduce-scatter timed out under torchft in a trial run);
- the groups all-gather their packed signs over the Manager's process group
  (``QuorumExchange``) and vote over the voters of this step's quorum;
- the step is applied only when the Manager commits it. A voter that dies mid-step makes
  the survivors' exchange fail: the error goes to the Manager, nobody commits, the
  parameters and momenta stay as they were, and the next quorum goes on without it;
- a group that joins (or fell behind) receives the parameters, DistLion's state (the
  step, its momentum, the vote EMA) from a live peer through torchft's state transfer.
  Then, as for a resume on another voter count (``on_topology_change="mean"``), every
  voter of the new quorum takes the mean of the momenta of the voters that were already
  training (the joiner's copy of its peer's counts for nothing): one bf16 all-reduce of
  the momentum per quorum change, as ``momentum_sync_every`` does, which here runs over the
  quorum too.

Bytes: the all-gather sends (M - 1) bits per coordinate per voter, M the quorum's voters,
counted in ``comm_stats`` with the averaging's.

Use::

    from torchft import Manager, ProcessGroupGloo      # ProcessGroupNCCL on GPUs
    from distlion.torchft import FaultTolerantDistLion

    manager = Manager(pg=ProcessGroupGloo(), min_replica_size=1, load_state_dict=None, state_dict=None,
                      use_async_quorum=False, replica_id=f"group_{os.environ['REPLICA_GROUP_ID']}")
    optimizer = FaultTolerantDistLion(manager, model, lr=1e-4, weight_decay=0.1)
    while manager.current_step() < steps:
        optimizer.zero_grad()        # this step's quorum; a joining group is healed here
        loss_fn(model(x), y).backward()
        optimizer.step()             # vote over the quorum; applied only if the Manager commits

The Manager must use ``use_async_quorum=False``: the quorum (and a heal) completes before
the forward pass, so every voter of the step votes with current weights.
This module reads two attributes torchft 0.2 keeps private (``Manager._quorum_id``, which
every member of a quorum sees alike, and ``Manager._use_async_quorum``).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distlion.comm.exchange import FLAG_BYTES
from distlion.comm.stats import CommStats, ring_allreduce_bytes
from distlion.momentum_sync import SYNC_DTYPE  # the momentum average's wire, as momentum_sync_every's
from distlion.optim import DistLion

logger = logging.getLogger(__name__)

STATE_KEY = "distlion"  # the key of the state transferred to a joining group (Manager.register_state_dict_fn)
DEFAULT_TIMEOUT_S = 60.0  # a collective over the quorum waits this long unless DistLion(timeout=...) says


def _torchft() -> Any:
    try:
        import torchft
    except ImportError as error:
        raise ImportError("distlion.torchft needs torchft: pip install 'distlion[torchft]' (or torchft)") from error
    return torchft


class ManagerQuorum:
    """The voters of each step: the replica groups in a torchft ``Manager``'s quorum (DistLion's ``quorum``).

    Collectives run on the Manager's process group; a failure is reported to the Manager
    (which then commits nothing this step) instead of raised, as torchft's own wrappers do.
    """

    def __init__(self, manager: Any, timeout: timedelta):
        from torchft.process_group import ManagedProcessGroup

        self.manager = manager
        self.group = ManagedProcessGroup(manager)
        self.timeout = timeout
        self.committed: bool | None = None  # the last step's decision

    def voters(self) -> int:
        """The voters of this step's quorum (waits for the quorum)."""
        return self.manager.num_participants()

    def transport_device(self, device: torch.device) -> torch.device:
        """Where the exchange's buffers live: gloo moves CPU tensors."""
        return torch.device("cpu") if "gloo" in self.group.getBackendName() else device

    def exchange(self, bucket_bytes: list[int], planes: int, device: torch.device, stats: CommStats
                 ) -> QuorumExchange:
        return QuorumExchange(self, bucket_bytes, planes, device, stats)

    def all_gather(self, outputs: list[Tensor], tensor: Tensor) -> Any:
        """Launch an all-gather of ``tensor`` into ``outputs`` (one per voter); None after a failure."""
        from torch.distributed.distributed_c10d import AllgatherOptions

        return self._launch(lambda: self.group.allgather([outputs], [tensor], AllgatherOptions()))

    def all_reduce(self, tensor: Tensor) -> Any:
        """Launch a sum of ``tensor`` over the voters, in place; None after a failure."""
        from torch.distributed.distributed_c10d import AllreduceOptions

        options = AllreduceOptions()
        options.reduceOp = dist.ReduceOp.SUM
        return self._launch(lambda: self.manager._pg.allreduce([tensor], options))

    def _launch(self, collective: Callable[[], Any]) -> Any:
        if self.manager.errored() is not None:
            return None  # the step is lost already: send nothing more
        try:
            return collective()
        except Exception as error:  # a peer is gone: the Manager skips this step and re-forms the quorum
            self.manager.report_error(error)
            return None

    def wait(self, work: Any) -> bool:
        """Wait for ``work``; False (reported to the Manager) if it failed, timed out or never started."""
        if work is None:
            return False
        try:
            work.wait(self.timeout)
            return True
        except Exception as error:
            self.manager.report_error(error)
            return False

    def commit(self) -> bool:
        """Ask the Manager whether every group may apply this step (once per step, on every rank)."""
        self.committed = bool(self.manager.should_commit())
        return self.committed


class QuorumExchange:
    """All-gather every voter's packed signs over the quorum; every voter votes on the whole chunk.

    Buffers follow the quorum's size. After a failure the vote runs on this voter's own bits
    (the step will not be committed) so that every stage still returns.
    """

    def __init__(self, quorum: ManagerQuorum, bucket_bytes: list[int], planes: int, device: torch.device,
                 stats: CommStats):
        self.quorum, self.stats, self.device = quorum, stats, device
        self.voters = 1
        self.transport = quorum.transport_device(device)
        self._voted = [torch.empty(planes, n, dtype=torch.uint8, device=device) for n in bucket_bytes]
        self._vote_out = self._voted if self.transport == device else \
            [torch.empty_like(v, device=self.transport) for v in self._voted]
        self._send = [torch.zeros(n + FLAG_BYTES, dtype=torch.uint8, device=self.transport) for n in bucket_bytes]
        self._gathered: list[Tensor | None] = [None] * len(bucket_bytes)
        self._pending: dict[int, Any] = {}

    def start(self, bucket: int, local_bits: Tensor, header: Tensor) -> None:
        if bucket == 0:
            self.voters = self.quorum.voters()
        send = self._send[bucket]
        nbytes = send.numel() - FLAG_BYTES
        send[:nbytes].copy_(local_bits)
        send[nbytes:].copy_(header)
        gathered = self._gathered[bucket]
        if gathered is None or gathered.shape[0] != self.voters:
            gathered = self._gathered[bucket] = torch.empty(self.voters, send.numel(), dtype=torch.uint8,
                                                            device=self.transport)
        self._pending[bucket] = self.quorum.all_gather(list(gathered.unbind(0)), send)

    def vote(self, bucket: int, vote: Callable[[Tensor, Tensor], None]) -> Tensor:
        gathered, send = self._gathered[bucket], self._send[bucket]
        nbytes = send.numel() - FLAG_BYTES
        if not self.quorum.wait(self._pending.pop(bucket)):
            gathered.copy_(send.expand_as(gathered))  # a placeholder: the Manager will not commit this step
        vote(gathered[:, :nbytes], self._vote_out[bucket])
        if self._vote_out[bucket] is not self._voted[bucket]:
            self._voted[bucket].copy_(self._vote_out[bucket])
        sent = (self.voters - 1) * send.numel()
        self.stats.count_inter_node(sent=sent, received=sent)
        return gathered[:, nbytes:].to(self.device)

    def finish(self, bucket: int) -> Tensor:
        return self._voted[bucket]


class FaultTolerantDistLion(torch.optim.Optimizer):
    """DistLion whose voters are the replica groups of a torchft ``Manager``'s quorum.

    Args:
        manager: this rank's ``torchft.Manager``, built with ``use_async_quorum=False``.
        model: the replica's model; its ``state_dict`` and the optimizer's are what a joining
            group receives (registered with the Manager under ``"distlion"``).
        params: parameters or param groups (default: ``model.parameters()``).
        lr, betas, weight_decay, **options: as for ``DistLion``. The replica group must be one
            rank (torch.distributed uninitialised, or a world of one). ``vote`` must be
            "majority" and ``k`` "sign" (the voter count changes between steps).

    ``zero_grad()`` starts the step's quorum (torchft's ``OptimizerWrapper`` does the same)
    and ``step()`` votes and applies it if the Manager commits. ``optimizer`` is the DistLion.
    """

    def __init__(self, manager: Any, model: nn.Module, params: Iterable | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, **options: Any):
        _torchft()
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError("FaultTolerantDistLion needs Manager(use_async_quorum=False): with an asynchronous "
                             "quorum a joining group would vote with the weights it had before its heal. Build "
                             "the Manager with use_async_quorum=False.")
        if "quorum" in options:
            raise ValueError("FaultTolerantDistLion builds the quorum from the Manager; do not pass quorum=")
        group = options.pop("process_group", None)
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        group_size = dist.get_world_size(group) if group is not None else 1
        if group_size > 1:
            raise ValueError(f"FaultTolerantDistLion runs replica groups of one rank; this group has {group_size} "
                             f"(torch.distributed's world or process_group). A group of several ranks voting as one "
                             f"node is not supported yet: launch each replica group as one process (torchrun "
                             f"--nproc_per_node 1), one group per GPU.")
        timeout = timedelta(seconds=options.get("timeout") or DEFAULT_TIMEOUT_S)
        self.manager = manager
        self.model = model
        self.quorum = ManagerQuorum(manager, timeout)
        self.optimizer = DistLion(model.parameters() if params is None else params, lr=lr, betas=betas,
                                  weight_decay=weight_decay, process_group=group, quorum=self.quorum, **options)
        self._quorum: tuple[Any, int] = (None, -1)  # (the quorum's id, the Manager's step when it formed)
        self._healed = False  # this group received a peer's state and has not committed a step since
        manager.register_state_dict_fn(STATE_KEY, self._load_transferred, self._state_to_transfer)

    # torch.optim.Optimizer's face, delegated to the DistLion
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def comm_stats(self) -> CommStats:
        return self.optimizer.comm_stats

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start this step's quorum (a joining group is healed before this returns) and clear the gradients."""
        self.manager.start_quorum()
        self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Vote over the quorum; apply only if the Manager commits. Returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        previous = self._average_momenta_if_due()
        self.optimizer.step()
        if self.quorum.committed:
            self._healed = False
        elif previous is not None:
            for momentum, saved in zip(self.optimizer.layout.momenta(), previous):
                momentum.copy_(saved)  # an uncommitted step changes nothing, the average included
        return loss

    # ----------------------------------------------------------- momenta of a changed quorum

    def _average_momenta_if_due(self) -> list[Tensor] | None:
        """Average the voters' momenta at a new quorum's first step (the resume rule "mean") or when
        ``momentum_sync_every`` is due; return the momenta before, None when not averaged.

        Every voter decides alike from what the quorum shares: its id, the Manager's step (equal
        on every voter once a group that fell behind is healed) and DistLion's step count.
        """
        quorum_id, manager_step = getattr(self.manager, "_quorum_id", None), self.manager.current_step()
        if quorum_id != self._quorum[0]:
            self._quorum = (quorum_id, manager_step)
        first_step = manager_step == self._quorum[1]  # no step committed in this quorum yet
        taken = self.optimizer.steps_taken
        every = self.optimizer.options.momentum_sync_every
        due = every is not None and taken % every == 0
        if not (first_step or due) or taken == 0 or self.quorum.voters() < 2:
            return None
        return self._average_momenta(weight=0.0 if self._healed else 1.0)

    def _average_momenta(self, weight: float) -> list[Tensor] | None:
        """Every voter's momentum becomes the mean of the voters' of weight 1 (bf16 on the wire)."""
        quorum, momenta = self.quorum, self.optimizer.layout.momenta()
        count = torch.tensor([weight], dtype=torch.float64)
        if not quorum.wait(quorum.all_reduce(count)) or count.item() == 0:
            return None
        voters = quorum.voters()
        wires = [(m.float() * (weight / count.item())).to(SYNC_DTYPE) for m in momenta]
        works = [quorum.all_reduce(wire) for wire in wires]
        if not all([quorum.wait(work) for work in works]):
            return None  # reported to the Manager: this step will not be committed
        previous = [m.clone() for m in momenta]
        for momentum, wire in zip(momenta, wires):
            momentum.copy_(wire)
        sent = 8 + sum(ring_allreduce_bytes(w.numel() * w.element_size(), voters) for w in wires)
        self.optimizer.comm_stats.count_inter_node(sent=sent, received=sent)
        return previous

    # ------------------------------------------------------------------- state transfer

    def _state_to_transfer(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _load_transferred(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._healed = True
        logger.info("DistLion: this replica group joined at step %d with a live peer's state",
                    self.optimizer.steps_taken)
