"""The layout protocol: where a step's tensors live, how gradients reach them and parameters leave them.

A layout is chosen once, when DistLion is built (``distlion.layouts.build``), and owns
the buckets of one ``distlion.buckets.BucketLayout`` plan: one ``BucketState`` per
bucket (the flat parameter values, this rank's chunk of the gradient, the momentum, the
packed signs, the fp32 master weights and the vote EMA). ``DistLion.step()`` drives it
through the same stages whatever it is::

    begin(grad_scale)                      before packing: shards in, the node's first reduce-scatters out
    pack(index, step, grad_scale) -> flag  this rank's signs of bucket ``index`` into ``state.bits``
    agree(skip) -> skip                    the skip OR-ed over the ranks that share a vote (node, shards)
    apply(index, voted, step, grad_scale)  the voted planes applied to the bucket's chunk
    end()                                  after applying: the node's all-gather, shards out

A new layout, or a new kind of state, is a subclass, never a branch in ``step()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.buckets import Bucket, BucketLayout, chunk_ranges, slot_views
from distlion.comm import CommStats, NodeCollectives, NodeShards, make_node
from distlion.comm.flat import wait_for
from distlion.kernels import kernels_for
from distlion.kernels.gather import gather_into
from distlion.local_shards import copy_shards, is_dtensor, local_grad, local_tensor, shard_groups
from distlion.options import DistLionOptions
from distlion.topology import NodeTopology
from distlion.vote import VoteRule

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class BucketState:
    """The tensors of one bucket, allocated once. ``values`` backs the parameters' data.

    ``values`` covers the whole bucket; the optimizer state covers this rank's chunk of
    it only (the whole bucket when a node is one rank).
    """

    bucket: Bucket
    params: list[Tensor]          # the optimizer's parameters, in slot order
    values: Tensor | None         # None when staged: FSDP2's local shards are the parameters
    grads: Tensor | None          # the chunk's gradient (the node's mean with nodes); None when staged
    momentum: Tensor
    bits: Tensor
    master: Tensor | None
    vote_ema: Tensor | None       # fp32 EMA of the voted steps, for groups with vote_ema_beta
    node_grads: Tensor | None = None  # the whole bucket's local gradient the node reduces (nodes only)
    grad_views: list = field(default_factory=list)      # each parameter's part of ``grads``
    gather_views: list = field(default_factory=list)    # where each p.grad is gathered to
    momentum_views: list = field(default_factory=list)  # each parameter's part of ``momentum`` (its exp_avg)


class Layout:
    """Shared by every layout: allocation, the per-parameter state views, masters, agreement, broadcast.

    Subclasses define ``pack`` and ``apply`` (and ``begin`` / ``end`` where they move data).
    """

    staged = False  # True when the parameters stay in FSDP's shards (no ``values``, no ``grads``)
    # True for a step whose parameters changed shape, dtype or requires_grad since the layout was built:
    # pack sends zeros (its collectives still run, with this layout's sizes) and the step is not applied
    stale = False

    def __init__(self, param_groups: list[dict], plan: BucketLayout, options: DistLionOptions,
                 topology: NodeTopology, vote_rule: VoteRule, stats: CommStats, state: dict,
                 previous: dict[int, dict[str, Tensor]] | None = None):
        self.param_groups = param_groups
        self.plan = plan
        self.options = options
        self.topology = topology
        self.vote_rule = vote_rule
        self.stats = stats
        self.timeout = options.timeout_delta
        self.state = state  # the optimizer's per-parameter state: views of the buckets' tensors
        self.params = [p for group in param_groups for p in group["params"]]
        self.shards: list[Tensor] = []       # DTensor parameters' local shards, and their bucket views
        self.shard_views: list[Tensor] = []
        self._shard_of: dict[int, Tensor] = {}
        self.states = [self._allocate(index, bucket) for index, bucket in enumerate(plan.buckets)]
        for state_ in self.states:
            self._place(state_, previous or {})
        self._data_ptrs = [local_tensor(p).data_ptr() for p in self.params]
        self._requires_grad = [p.requires_grad for p in self.params]
        self._masters = [pair for state_ in self.states for pair in self._master_pairs(state_)]
        self._master_versions = [param._version for param, _, _ in self._masters]
        ids = {id(shard) for shard in self.shards}
        self._shard_masters = [i for i, (tracked, _, _) in enumerate(self._masters) if id(tracked) in ids]
        device = plan.buckets[0].device if plan.buckets else torch.device("cpu")
        self.node: NodeShards = make_node(topology, stats, device, self.timeout)
        # FSDP's shards: each rank sees the non-finite values of its own shards only, so a replica's ranks
        # agree on a skip as a node's do
        groups = shard_groups(self.params)
        self._shard_agreement = [NodeCollectives(group, dist.get_rank(group), stats, self.timeout)
                                 for group in groups]
        self.shard_rank = dist.get_rank(groups[0]) if groups else None  # which shards this rank holds

    # ------------------------------------------------------------ what every layout shares

    @property
    def buckets(self) -> list[Bucket]:
        return self.plan.buckets

    def chunk_bytes(self) -> list[int]:
        """Bytes of packed signs this rank sends per bucket."""
        return [self.vote_rule.packed_planes * b.padded_numel // self.topology.ranks_per_node // 8
                for b in self.buckets]

    def is_current(self) -> bool:
        """False once the parameters were moved, replaced, frozen or unfrozen since this layout was built."""
        params = [p for group in self.param_groups for p in group["params"]]
        return [local_tensor(p).data_ptr() for p in params] == self._data_ptrs and \
            [p.requires_grad for p in params] == self._requires_grad

    def momenta(self) -> list[Tensor]:
        """Each bucket's momentum chunk (what the voters average under momentum sync)."""
        return [state.momentum for state in self.states]

    def grads_of(self, state: BucketState) -> list[Tensor | None]:
        """The gradients of the bucket's parameters in slot order (None where missing)."""
        grads = [local_grad(param) for param in state.params]
        for param, grad in zip(state.params, grads):
            if grad is not None and grad.is_sparse:
                raise RuntimeError(f"DistLion does not support sparse gradients (parameter of shape "
                                   f"{tuple(param.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)")
        return grads

    def gradients_nonzero(self) -> bool:
        """True when this rank has a non-zero gradient."""
        return any(grad is not None and bool(grad.any()) for state in self.states for grad in self.grads_of(state))

    def agree(self, summary: Tensor) -> Tensor:
        """The step's ``summary`` (``distlion.agreement``) MAX-ed over the node (chunk j's voters know of chunk
        j) and over FSDP's shard groups, so every rank skips, or raises, together."""
        summary = self.node.agree(summary)
        for shards in self._shard_agreement:
            summary = shards.agree(summary)
        return summary

    def nonfinite_here(self) -> list[str]:
        """This rank's parameters whose values or gradients hold inf or nan, named (or by position and shape)."""
        names = [name for group in self.param_groups
                 for name in group.get("param_names", [None] * len(group["params"]))]
        found = []
        for position, param in enumerate(self.params):
            grad = local_grad(param)
            for what, tensor in (("values", local_tensor(param)), ("gradient", grad)):
                if tensor is not None and not bool(torch.isfinite(tensor).all()):
                    label = names[position] if position < len(names) and names[position] else f"#{position}"
                    found.append(f"parameter {label} (shape {tuple(param.shape)}): {what}")
        return found

    def begin(self, grad_scale: Tensor | None) -> None:
        """Before packing: copy the DTensor parameters' local shards in (they may have been changed)."""
        if self.shard_views:
            copy_shards(self.shard_views, self.shards)

    def end(self) -> None:
        """After applying: copy the updated bucket views back into the local shards, which FSDP owns."""
        if self.shard_views:
            copy_shards(self.shards, self.shard_views)
        for index in self._shard_masters:  # DistLion's own write, not a change to follow
            self._master_versions[index] = self._masters[index][0]._version

    def pack(self, index: int, step: int, grad_scale: Tensor | None) -> Tensor:
        """Pack bucket ``index``'s signs into its ``bits``; return its non-finite flag (0-dim bool)."""
        raise NotImplementedError

    def apply(self, index: int, voted: Tensor, step: int, grad_scale: Tensor | None) -> None:
        """Update the momentum and apply the voted planes to bucket ``index`` (the step was agreed)."""
        raise NotImplementedError

    def votes_on_parameters(self, exchange_name: str) -> bool:
        """True when the coordinates this rank votes on include parameters, not bucket padding only (a tiny
        model's last chunk can be all padding, whose signs every voter packs alike)."""
        top = self.topology
        for bucket in self.buckets:
            start = top.local_rank * (bucket.padded_numel // top.ranks_per_node)
            if exchange_name == "two_phase":  # this voter's share of its node chunk
                start += top.node * (bucket.padded_numel // top.ranks_per_node // top.nodes)
            if start < bucket.numel:
                return True
        return False

    @torch.no_grad()
    def broadcast_from_first(self) -> None:
        """Give every rank rank 0's parameters, as DDP does at construction (one collective per bucket and group).

        Through the vote group first (rank j of every node gets node 0's rank j's values),
        then through the node group (every rank gets its node's first rank's).
        """
        groups = [g for g in (self.topology.vote_group, self.topology.node_group) if g is not None]
        for index, state in enumerate(self.states):
            values = self._whole_values(index)
            for group in groups:
                wait_for(dist.broadcast(values, src=dist.get_global_rank(group, 0), group=group, async_op=True),
                         "the broadcast of rank 0's parameters", self.timeout)
            if state.master is not None:
                state.master.copy_(self.topology.chunk(values))
            self._store_whole_values(index, values)
        self.end()

    def follow_parameter_changes(self, compare_all: bool) -> None:
        """Re-seed the master weights of parameters changed in place since DistLion last wrote them.

        A parameter changed in place (``load_state_dict``, re-initialisation) bumps its
        ``_version``; DistLion writes through the bucket, which does not. Where the changed
        parameter no longer equals its rounded master, the parameter wins: its values become
        the master's. ``compare_all`` compares every parameter (after a re-layout).
        """
        reseeded = 0
        for index, (param, master, part) in enumerate(self._masters):
            version = param._version
            if compare_all or version != self._master_versions[index]:
                if not torch.equal(master.to(part.dtype), part):
                    master.copy_(part)
                    reseeded += 1
                self._master_versions[index] = version
        if reseeded:
            logger.info("DistLion: %d parameter(s) changed in place; their fp32 master weights now hold the "
                        "new values", reseeded)

    # ------------------------------------------------------------ building

    def _whole_values(self, index: int) -> Tensor:
        """Bucket ``index``'s parameter values as one flat tensor (to broadcast)."""
        return self.states[index].values

    def _store_whole_values(self, index: int, values: Tensor) -> None:
        """Write ``_whole_values``' tensor back where the parameters live."""
        # the parameters are views of ``values``: nothing to write

    def _node_grads_of(self, index: int, bucket: Bucket) -> Tensor | None:
        """The whole-bucket buffer the node's reduce-scatter reads (None without nodes)."""
        return None

    def _allocate(self, index: int, bucket: Bucket) -> BucketState:
        n, dev = bucket.padded_numel, bucket.device
        chunk = n // self.topology.ranks_per_node
        node_grads = self._node_grads_of(index, bucket)
        grad_dtype = self.options.reduce_dtype if node_grads is not None else bucket.dtype
        low_precision = bucket.dtype in LOW_PRECISION and self.options.master_weights
        scaled = self.param_groups[bucket.group_index]["vote_ema_beta"] is not None
        state = BucketState(
            bucket=bucket,
            params=[self.params[slot.param_index] for slot in bucket.slots],
            values=None if self.staged else torch.zeros(n, dtype=bucket.dtype, device=dev),
            grads=None if self.staged else torch.zeros(chunk, dtype=grad_dtype, device=dev),
            momentum=torch.zeros(chunk, dtype=self.options.momentum_dtype, device=dev),
            bits=torch.zeros(self.vote_rule.packed_planes * chunk // 8, dtype=torch.uint8, device=dev),
            master=torch.zeros(chunk, dtype=torch.float32, device=dev) if low_precision else None,
            vote_ema=torch.zeros(chunk, dtype=torch.float32, device=dev) if scaled else None,
            node_grads=node_grads,
        )
        state.grad_views = self._chunk_views(state.grads, bucket)
        state.gather_views = state.grad_views if node_grads is None else slot_views(node_grads, bucket)
        return state

    def _place(self, state: BucketState, previous: dict[int, dict[str, Tensor]]) -> None:
        """Make the parameters views of the bucket (a DTensor's shard is copied in instead: FSDP owns its
        storage) and the optimizer state views of the chunk buffers, carrying ``previous`` tensors over."""
        bucket = state.bucket
        views = slot_views(state.values, bucket) if state.values is not None else [None] * len(state.params)
        for param, view in zip(state.params, views):
            if is_dtensor(param):
                self.shards.append(local_tensor(param))
                self._shard_of[id(param)] = self.shards[-1]
                if view is not None:
                    self.shard_views.append(view)
                    view.copy_(self.shards[-1])
            else:
                view.copy_(param.detach())
                param.data = view  # the parameter now lives in the bucket
        if state.master is not None and state.values is None:
            copy_shards(slot_views(state.master, bucket), [local_tensor(p) for p in state.params])
        elif state.master is not None:
            state.master.copy_(self.topology.chunk(state.values))
        for slot, param, momentum, master, vote_ema in zip(
                bucket.slots, state.params, self._chunk_views(state.momentum, bucket),
                self._chunk_views(state.master, bucket), self._chunk_views(state.vote_ema, bucket)):
            tensors = {"exp_avg": momentum}
            if master is not None:
                tensors["master"] = master
            if vote_ema is not None:
                tensors["vote_ema"] = vote_ema
            carried = previous.get(slot.param_index, {})
            for key, value in tensors.items():
                if key in carried:
                    value.copy_(carried[key])
            self.state[param] = tensors
        state.momentum_views = [self.state[param]["exp_avg"] for param in state.params]

    def _chunk_views(self, chunk: Tensor | None, bucket: Bucket) -> list[Tensor | None]:
        """Each parameter's part of a chunk buffer: shaped like it when the chunk is the whole bucket,
        else the flat slice of it that falls in this rank's chunk (empty for a parameter outside it)."""
        if chunk is None:
            return [None] * len(bucket.slots)
        if self.topology.ranks_per_node == 1:
            return slot_views(chunk, bucket)
        return [chunk[lo:hi] for lo, hi, _ in chunk_ranges(bucket, chunk.numel(), self.topology.local_rank)]

    def _master_pairs(self, state: BucketState) -> list[tuple]:
        """(what counts the parameter's in-place changes, its master weights, the part of the parameter they
        hold) for a bucket with masters. A DTensor's changes show in its local shard's version."""
        if state.master is None:
            return []
        masters = [self.state[param]["master"] for param in state.params]
        versioned = [self._shard_of.get(id(param), param) for param in state.params]
        if self.topology.ranks_per_node == 1:
            return [(tracked, master, tracked.data) for tracked, master in zip(versioned, masters)]
        return [(tracked, master, tracked.data.view(-1)[first:first + master.numel()])
                for tracked, master, (_, _, first) in zip(
                    versioned, masters, chunk_ranges(state.bucket, state.master.numel(), self.topology.local_rank))]

    # ------------------------------------------------------------ packing and applying a chunk

    def _group(self, state: BucketState) -> dict[str, Any]:
        return self.param_groups[state.bucket.group_index]

    def _momentum_in_pack(self, state: BucketState) -> bool:
        """True when the pack pass can write the new momentum over the gradient buffer (same dtype; not for
        Lion-K's ternary rules, whose pack leaves the momentum to ``update_momentum``)."""
        return state.grads is not None and state.grads.dtype == state.momentum.dtype and \
            not self.vote_rule.ternary

    def _gather_grads(self, state: BucketState, grad_scale: Tensor | None) -> None:
        """Copy the parameters' gradients into the gather views, unscaled by GradScaler's ``grad_scale``."""
        if self.stale:
            torch._foreach_zero_(state.gather_views)
            return
        gather_into(self.grads_of(state), state.gather_views)
        if grad_scale is not None:
            target = state.grads if state.node_grads is None else state.node_grads
            target.mul_(grad_scale.double().reciprocal().float())

    def _pack_chunk(self, state: BucketState, step: int) -> Tensor:
        """Pack the signs of the chunk gradient in ``state.grads`` (and the new momentum, where it fits)."""
        kernels = kernels_for(state.bucket.device)
        beta1, beta2 = self._group(state)["betas"]
        if self.vote_rule.ternary:
            return self.vote_rule.pack(state.grads, state.momentum, state.bits, beta1=beta1)
        if self._momentum_in_pack(state):
            return kernels.pack_signs_and_momentum(state.grads, state.momentum, state.bits, state.grads,
                                                   beta1=beta1, beta2=beta2, parity=step % 2)
        return kernels.pack_signs_and_check(state.grads, state.momentum, state.bits, beta1=beta1,
                                            parity=step % 2)

    def _zero_signs(self, state: BucketState) -> Tensor:
        """Pack zeros and no non-finite flag: a re-layout is asked for (``stale``) and the step is not applied."""
        state.bits.zero_()
        return torch.zeros((), dtype=torch.bool, device=state.bits.device)

    def _apply_chunk(self, state: BucketState, voted: Tensor, step: int) -> None:
        """New momentum, then the voted step on this rank's chunk of the bucket's values (or its masters)."""
        group = self._group(state)
        if self._momentum_in_pack(state):
            self._swap_momentum(state)
        else:
            kernels_for(state.bucket.device).update_momentum(state.grads, state.momentum, beta2=group["betas"][1])
        self.vote_rule.apply(self.topology.chunk(state.values), voted, lr=group["lr"],
                             weight_decay=group["weight_decay"], master=state.master, vote_ema=state.vote_ema,
                             beta=group["vote_ema_beta"], step=step)

    def _swap_momentum(self, state: BucketState) -> None:
        """Make the gradient buffer, which holds the new momentum, the momentum; the old one is scratch.

        Done only once every rank agreed to take the step, so a skipped step leaves the
        momentum untouched without a second momentum buffer or an extra pass over memory.
        """
        state.grads, state.momentum = state.momentum, state.grads
        state.grad_views, state.momentum_views = state.momentum_views, state.grad_views
        if state.gather_views is state.momentum_views:  # gradients are gathered into the chunk itself
            state.gather_views = state.grad_views
        for param, momentum in zip(state.params, state.momentum_views):
            self.state[param]["exp_avg"] = momentum
