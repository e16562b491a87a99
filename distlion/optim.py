"""DistLion: Lion with a 1-bit majority-voted update shared by all data-parallel ranks.

Each rank computes its local Lion direction from its own gradients, sends only the
signs (1 bit per coordinate, packed), and every rank applies the same voted sign with
decoupled weight decay, so parameters stay bit-identical without any broadcast::

    c_i  = beta1*m_i + (1-beta1)*g_i          local interpolation
    s_i  = sign(c_i)                          1 bit; c_i == 0 -> alternating pattern
    m_i <- beta2*m_i + (1-beta2)*g_i          local momentum, never communicated
    D    = sign(sum_i s_i)                    vote="majority" (tie: voter step % M decides)
         | (1/M) * sum_i s_i                  vote="average"
    x   <- x*(1 - lr*wd) - lr*D
    with vote_ema_beta=b:  e <- b*e + (1-b)*D;  x <- x*(1 - lr*wd) - lr*D*(e/(1-b^t))^2

With ``ranks_per_node=G`` a node of G ranks votes as one worker i: g_i is the mean of
its ranks' gradients (an intra-node reduce-scatter), rank j of the node holds the
momentum, master weights and vote EMA of chunk j of every bucket only, votes on chunk j
with rank j of the other M - 1 nodes, applies it, and the node all-gathers the updated
parameters. ``ranks_per_node=1`` is the flat vote of every rank (M = N).

Under FSDP2 (``fully_shard`` over the "shard" dim of a (replicate, shard) mesh) each
rank lays out, updates and votes on its parameters' local shards, with FSDP's
reduce-scatter as the node's gradient (``distlion.local_shards``).

With one rank (or no process group) and no vote_ema_beta this is exactly Lion. With
``k="dead_zone"`` or ``"top"`` the sign becomes Lion-K's ternary t_i in {-1, 0, +1}
(two bits per coordinate) and D = sign(sum_i t_i), or their mean (``distlion.vote``).
``step()`` only orchestrates: kernels (``distlion.kernels``) do the math, the vote rule
(``distlion.vote``) owns the vote, exchanges and node collectives (``distlion.comm``)
move the bytes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from distlion.averaged import AveragedGradientsCheck
from distlion.checks import check_hyperparameters, check_layout_agrees, check_parameters, is_real_number
from distlion.comm import CommStats, NodeCollectives, choose_exchange, make_exchange, make_node, ring_allreduce_bytes
from distlion.comm.flat import wait_for
from distlion.constraint import measure, overall
from distlion.kernels import kernels_for
from distlion.kernels.gather import gather_into
from distlion.layout import Bucket, BucketLayout, build_layout, slot_views
from distlion.local_shards import (ShardStaging, check_sharded_parameters, copy_shards, is_dtensor, is_sharded,
                                   local_grad, local_param_groups, local_tensor, shard_groups, vote_group_of_mesh)
from distlion.momentum_sync import MomentumSync, check_every
from distlion.topology import (AUTO, NodeTopology, check_ranks_per_node, from_groups, resolve_ranks_per_node,
                               single_rank, split_group)
from distlion.vote import K_RULES, VOTES, VoteRule

logger = logging.getLogger(__name__)

EXCHANGES = ("auto", "two_phase", "all_gather")
STATE_FORMAT = 1
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class _BucketBuffers:
    """Flat tensors of one bucket, allocated once. ``params`` backs the parameters' data.

    ``params`` covers the whole bucket; the optimizer state covers this rank's chunk of
    it only (the whole bucket when a node is one rank).
    """

    params: Tensor | None      # None when staged: FSDP2's local shards are the parameters (ShardStaging)
    node_grads: Tensor | None  # the whole bucket's local gradient, reduced over the node (ranks_per_node > 1):
                               # a view of one of two staging buffers that every bucket shares
    grads: Tensor | None       # the chunk's gradient: the node's mean over its ranks (None when staged)
    momentum: Tensor
    bits: Tensor
    master: Tensor | None
    vote_ema: Tensor | None  # fp32 EMA of the voted steps, for groups with vote_ema_beta


class DistLion(torch.optim.Optimizer):
    """Lion whose update is the vote of every data-parallel rank's (or node's) 1-bit sign.

    Args:
        params: parameters or param groups (groups may set lr, betas, weight_decay,
            vote_ema_beta).
        lr: learning rate (Lion wants 3-10x less than AdamW).
        betas: (beta1, beta2): interpolation for the sign and momentum decay.
        weight_decay: decoupled weight decay (Lion wants 3-10x more than AdamW).
        vote: "majority" (sign of the sum of signs) or "average" (mean of the signs).
        exchange: "two_phase", "all_gather", or "auto" (all_gather for M <= 2 voters).
        process_group: the data-parallel ranks; default the world group when
            torch.distributed is initialised, else a single rank (plain Lion). With
            ``node_group``, the ranks that vote with this one (one per node).
        bucket_cap_mb: soft cap on a bucket, in MiB of fp32; one collective per bucket.
        master_weights: keep fp32 copies of bf16/fp16 parameters and update those
            (a small lr vanishes in bf16 otherwise).
        momentum_dtype: dtype of the momentum; default float32.
        vote_ema_beta: None (default): every coordinate moves by the full lr, as in
            Lion. A beta in [0, 1), e.g. 0.9: keep an fp32 EMA of each coordinate's
            voted step and scale the step by the square of the bias-corrected EMA, so a
            coordinate whose vote keeps its sign moves by up to lr and one whose vote
            flips moves much less (Adam's adaptivity, from the shared votes alone: no
            extra bytes, 4 more bytes of state per parameter). Such steps are smaller
            on average: use a larger lr (2x AdamW's on the demo task).
        ranks_per_node: G, the ranks of one node, which vote as one worker: ranks
            ``[k*G, (k+1)*G)`` of ``process_group`` form node k (torchrun's order).
            1: every rank votes. "auto" (default): ``LOCAL_WORLD_SIZE`` when the world
            group spans more than one node, else 1.
        node_group: a process group of this node's ranks, built by the caller, instead
            of ``ranks_per_node``; ``process_group`` is then the group of the ranks with
            the same place in every node.
        reduce_dtype: dtype of the intra-node gradient reduce-scatter; default float32.
        timeout: seconds any DistLion collective may take before every waiting rank
            raises a ``CollectiveError`` naming the likely cause (a rank that exited,
            uneven step counts); None (default): the process group's own timeout.
        device_mesh: a (replicate, shard) mesh whose "shard" dim FSDP2 shards the
            parameters over (``fully_shard(module, mesh=mesh["shard"])``): the
            "replicate" dim's ranks vote, instead of ``process_group``. Each rank
            updates and votes on its local shards; FSDP's reduce-scatter is the node's
            gradient, so ``ranks_per_node`` resolves to 1.
        k: Lion-K's gradient of K applied to c (``distlion.kernels.ternary``). "sign"
            (default): Lion, 1 bit per coordinate. "dead_zone": sign(c) where |c| >
            ``k_threshold`` * mean |c| of the voter's bucket (its chunk with nodes), else 0.
            "top": sign(c) for the ``k_fraction`` of the bucket's coordinates with the largest
            |c| (ties move too), else 0. The ternary rules send 2 bits per coordinate (plus,
            minus; counted in ``comm_stats``); the majority vote is sign(sum of the t_i), 0
            where it is 0; the average is their mean. Not with FSDP2 parameters.
        k_threshold: the dead zone's width in units of the bucket's mean |c| (>= 0).
        k_fraction: the share of coordinates that move under k="top", in (0, 1].
        momentum_sync_every: K: every K applied steps the voters' momenta are replaced by
            their mean, sent as bf16 (``distlion.momentum_sync``; 24/K bits per coordinate
            per step at 4 voters, counted in ``comm_stats``). None (default): never.

    Example::

        opt = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    # GradScaler calls step() on every rank and hands over ``grad_scale`` and
    # ``found_inf``, so a skip can be agreed by all ranks instead of decided per rank.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, vote: str = "majority", exchange: str = "auto",
                 process_group: Any = None, bucket_cap_mb: float = 25, master_weights: bool = True,
                 momentum_dtype: torch.dtype | None = None, vote_ema_beta: float | None = None,
                 ranks_per_node: int | str = AUTO, node_group: Any = None, reduce_dtype: torch.dtype | None = None,
                 timeout: float | None = None, device_mesh: Any = None, k: str = "sign", k_threshold: float = 1.0,
                 k_fraction: float = 0.1, momentum_sync_every: int | None = None):
        check_hyperparameters(lr, betas, weight_decay, vote_ema_beta)
        _check_lion_k(k, k_threshold, k_fraction)
        check_every(momentum_sync_every)
        check_ranks_per_node(ranks_per_node)
        if timeout is not None and not (is_real_number(timeout) and 0 < timeout < math.inf):
            raise ValueError(f"Invalid timeout: {timeout!r}; use seconds > 0, or None for the process group's")
        if vote not in VOTES:
            raise ValueError(f"Invalid vote: {vote!r}; use one of {VOTES}")
        if exchange not in EXCHANGES:
            raise ValueError(f"Invalid exchange: {exchange!r}; use one of {EXCHANGES}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb}; use a positive size in MiB")
        momentum_dtype = momentum_dtype or torch.float32
        if not momentum_dtype.is_floating_point:
            raise ValueError(f"Invalid momentum_dtype: {momentum_dtype}; use a floating dtype")
        reduce_dtype = reduce_dtype or torch.float32
        if not (isinstance(reduce_dtype, torch.dtype) and reduce_dtype.is_floating_point):
            raise ValueError(f"Invalid reduce_dtype: {reduce_dtype}; use a floating dtype, e.g. torch.float32")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, vote=vote, exchange=exchange,
                        bucket_cap_mb=bucket_cap_mb, master_weights=master_weights,
                        momentum_dtype=momentum_dtype, vote_ema_beta=vote_ema_beta, reduce_dtype=reduce_dtype)
        super().__init__(params, defaults)  # add_param_group checks each group

        if device_mesh is not None:
            if process_group is not None or node_group is not None:
                raise ValueError("pass device_mesh or process_group / node_group, not both: device_mesh's "
                                 "'replicate' dim is the vote group")
            process_group = vote_group_of_mesh(device_mesh)
        self.device_mesh = device_mesh
        self.process_group = _resolve_group(process_group)
        self.timeout = timedelta(seconds=timeout) if timeout is not None else None
        self.vote = vote
        self.k = k
        self._k_settings = {"k": k, "k_threshold": k_threshold, "k_fraction": k_fraction,
                            "momentum_sync_every": momentum_sync_every}
        self.comm_stats = CommStats()
        self._step = 0
        self.overflow = False  # True after a step that every rank skipped
        self._warned_skip = False
        self._warned_momentum = False  # a float16 momentum's overflow is reported once
        self._pending_tensors: dict | None = None  # loaded before a re-layout, applied by it
        self._constraint_previous: list[float | None] | None = None  # ||lambda x||_inf per group, last measured
        self.topology = self._resolve_topology(process_group, ranks_per_node, node_group)
        self.world_size = self.topology.world_size
        self.rank = self.topology.rank
        self.ranks_per_node = self.topology.ranks_per_node
        self.vote_rule = VoteRule(vote, self.topology.nodes, k, k_threshold, k_fraction)
        if self.vote_rule.ternary and any(is_sharded(p) for p in self._params_in_order()):
            raise ValueError(f"k={k!r} with parameters sharded by FSDP2 is not supported: DistLion stages FSDP's "
                             f"shards piece by piece, and the ternary rules need a whole bucket's |c| at once. "
                             f"Use k='sign' with FSDP2, or k={k!r} without FSDP (plain or ranks_per_node).")
        self.exchange_name = choose_exchange(exchange, self.topology.nodes)
        self.comm_stats.ranks_per_node = self.ranks_per_node
        self._momentum_sync = MomentumSync(momentum_sync_every, self.topology.vote_group, self.topology.nodes,
                                           self.comm_stats, self.timeout)
        self._build(previous=None)
        self._averaged_check = AveragedGradientsCheck(self.topology.nodes, self.comm_stats,
                                                      judges=self._votes_on_parameters())
        self._broadcast_parameters()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (laid out at the next ``step()``), checking its values and parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group["lr"], group["betas"], group["weight_decay"], group["vote_ema_beta"])
            for key in ("vote", "exchange", "bucket_cap_mb", "master_weights", "momentum_dtype", "reduce_dtype"):
                if group[key] != self.defaults[key]:
                    raise ValueError(f"{key} must be the same for all param groups; got {group[key]!r} "
                                     f"in a group and {self.defaults[key]!r} for the optimizer")
            check_parameters(self._params_in_order())
            if getattr(self, "topology", None) is not None:  # set once __init__ resolved the nodes
                check_sharded_parameters(group["params"], self.topology.vote_group, self.ranks_per_node)
        except ValueError:
            self.param_groups.pop()  # the optimizer stays as it was
            raise

    def _resolve_topology(self, process_group: Any, ranks_per_node: int | str, node_group: Any) -> NodeTopology:
        """Find the nodes, checking on every rank that all ranks agree before any group is built.

        Parameters sharded by FSDP make every rank a node of its own (FSDP reduced the
        gradient inside the node): ``ranks_per_node`` resolves to 1.
        """
        params = self._params_in_order()
        if any(is_sharded(p) for p in params):
            if node_group is not None and dist.get_world_size(node_group) > 1:
                raise ValueError("node_group with parameters sharded by FSDP: FSDP's reduce-scatter already gives "
                                 "each rank its node's gradient; pass device_mesh=mesh (or process_group="
                                 "mesh.get_group('replicate')) and no node_group")
            check_sharded_parameters(params, self.process_group, ranks_per_node)
            ranks_per_node = 1
        if node_group is not None:
            if process_group is None:
                raise ValueError("node_group needs process_group: pass the group of the ranks that vote with "
                                 "this one (the rank with the same place in every node), or pass ranks_per_node "
                                 "instead of node_group")
            topology = from_groups(self.process_group, node_group)
            if ranks_per_node not in (AUTO, topology.ranks_per_node):
                raise ValueError(f"ranks_per_node={ranks_per_node!r} differs from the size of node_group "
                                 f"({topology.ranks_per_node}); leave ranks_per_node at 'auto' with node_group")
            self._check_agreement([self.process_group, node_group], topology.world_size, topology.ranks_per_node)
            return topology
        if self.process_group is None:
            if ranks_per_node not in (AUTO, 1):
                raise ValueError(f"ranks_per_node={ranks_per_node!r} needs torch.distributed: initialise the "
                                 f"process group first (e.g. launch with torchrun), or use ranks_per_node=1")
            return single_rank()
        world_size = dist.get_world_size(self.process_group)
        resolved = resolve_ranks_per_node(ranks_per_node, world_size, self.process_group is dist.group.WORLD)
        self._check_agreement([self.process_group], world_size, resolved)
        return split_group(self.process_group, resolved)

    def _check_agreement(self, groups: list[Any], world_size: int, ranks_per_node: int) -> None:
        """Raise on every rank of ``groups`` if any of them laid out other parameters or nodes, or differs in
        a setting that must match (lr, betas, weight decay, vote, ...): replicas would drift apart."""
        layout = self._new_layout(world_size)
        settings = {key: self.defaults[key] for key in ("vote", "exchange", "master_weights", "momentum_dtype",
                                                        "reduce_dtype")}
        settings.update(self._k_settings)  # the ternary rules and the sync send other bytes: a difference would hang
        for index, group in enumerate(self.param_groups):
            for key in ("lr", "betas", "weight_decay", "vote_ema_beta"):
                settings[f"param group {index} {key}"] = group[key]
        for group in groups:
            check_layout_agrees(layout, group, ranks_per_node, settings, self.timeout)

    def _broadcast_parameters(self) -> None:
        """Give every rank rank 0's parameters, as DDP does at construction (one collective per bucket and group).

        Through the vote group first (rank j of every node gets node 0's rank j's values),
        then through the node group (every rank gets its node's first rank's).
        """
        groups = [group for group in (self.topology.vote_group, self.topology.node_group) if group is not None]
        for index, (bucket, buffers) in enumerate(zip(self.layout.buckets, self._buffers)):
            params = buffers.params
            if self._staging is not None:  # a whole bucket, once: the shards in, rank 0's values out
                params = torch.zeros(bucket.padded_numel, dtype=bucket.dtype, device=bucket.device)
                copy_shards([view.view(-1) for view in slot_views(params, bucket)], self._staging.shards[index])
            for group in groups:
                wait_for(dist.broadcast(params, src=dist.get_global_rank(group, 0), group=group, async_op=True),
                         "the broadcast of rank 0's parameters", self.timeout)
            if buffers.master is not None:
                buffers.master.copy_(self.topology.chunk(params))
            if self._staging is not None:
                copy_shards(self._staging.shards[index], [view.view(-1) for view in slot_views(params, bucket)])
        self._copy_out_shards()

    # ------------------------------------------------------------------ layout

    def _params_in_order(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _new_layout(self, world_size: int | None = None) -> BucketLayout:
        """Lay out the parameters this rank holds (a DTensor's local shard) for ``world_size`` voters."""
        return build_layout(local_param_groups(self.param_groups), world_size or self.world_size,
                            self.defaults["bucket_cap_mb"])

    def _copy_in_shards(self) -> None:
        """Copy the DTensor parameters' local shards into their bucket views (they may have been changed)."""
        if self._shard_views:  # none when staged
            copy_shards(self._shard_views, self._shards)

    def _copy_out_shards(self) -> None:
        """Copy the updated bucket views back into the DTensor parameters' local shards, which FSDP owns."""
        if self._shard_views:
            copy_shards(self._shards, self._shard_views)
        for index in self._shard_masters:  # DistLion's own write, not a change to follow
            self._master_versions[index] = self._masters[index][0]._version

    def _build(self, previous: dict[int, dict[str, Tensor]] | None) -> None:
        """Lay out parameters into flat buckets and make them views of those buckets.

        A DTensor parameter's local shard is copied into its bucket view instead: FSDP owns
        its storage, and ``step()`` copies the updated values back. ``previous`` maps param
        index to state tensors to carry over (a re-layout after the parameters were moved or
        replaced); None starts from zero momentum.
        """
        self.layout: BucketLayout = self._new_layout()
        params = self._params_in_order()
        members_of = [[params[slot.param_index] for slot in bucket.slots] for bucket in self.layout.buckets]
        staged = self.ranks_per_node == 1 and bool(params) and all(is_sharded(p) for p in params) and \
            ShardStaging.can_stage([local_tensor(p) for p in params])
        # FSDP2's shards and gradients are staged piece by piece rather than copied into buckets
        self._staging = ShardStaging(self.layout.buckets, [[local_tensor(p) for p in members]
                                                           for members in members_of]) if staged else None
        self._shards: list[Tensor] = []      # DTensor parameters' local shards, and their bucket views
        self._shard_views: list[Tensor] = []
        self._shard_of: dict[int, Tensor] = {}  # id(DTensor parameter) -> its local shard
        self._buffers: list[_BucketBuffers] = []
        self._gather_views: list[list[Tensor]] = []    # where each p.grad is gathered to
        self._grad_views: list[list[Tensor]] = []      # each parameter's part of the chunk buffers
        self._momentum_views: list[list[Tensor]] = []
        self._bucket_params: list[list[Tensor]] = []
        staging = self._allocate_staging()
        for bucket in self.layout.buckets:
            buffers = self._allocate(bucket, staging)
            members = members_of[len(self._buffers)]
            views = slot_views(buffers.params, bucket) if buffers.params is not None else [None] * len(members)
            for param, view in zip(members, views):
                if is_dtensor(param):
                    self._shards.append(local_tensor(param))
                    self._shard_of[id(param)] = self._shards[-1]
                    if view is not None:
                        self._shard_views.append(view)
                        view.copy_(self._shards[-1])
                else:
                    view.copy_(param.detach())
                    param.data = view  # the parameter now lives in the bucket
            if buffers.master is not None and buffers.params is None:
                copy_shards(slot_views(buffers.master, bucket), [local_tensor(p) for p in members])
            elif buffers.master is not None:
                buffers.master.copy_(self.topology.chunk(buffers.params))
            for slot, param, momentum, master, vote_ema in zip(
                    bucket.slots, members, self._chunk_views(buffers.momentum, bucket),
                    self._chunk_views(buffers.master, bucket), self._chunk_views(buffers.vote_ema, bucket)):
                state = {"exp_avg": momentum}
                if master is not None:
                    state["master"] = master
                if vote_ema is not None:
                    state["vote_ema"] = vote_ema
                carried = (previous or {}).get(slot.param_index, {})
                for key, value in state.items():
                    if key in carried:
                        value.copy_(carried[key])
                self.state[param] = state
            self._buffers.append(buffers)
            self._grad_views.append(self._chunk_views(buffers.grads, bucket))
            self._gather_views.append(self._grad_views[-1] if buffers.node_grads is None
                                      else slot_views(buffers.node_grads, bucket))
            self._momentum_views.append([self.state[param]["exp_avg"] for param in members])
            self._bucket_params.append(members)
        self._laid_out = params
        self._data_ptrs = [local_tensor(p).data_ptr() for p in params]
        self._requires_grad = [p.requires_grad for p in params]
        self._masters = [pair for bucket, buffers, members in zip(self.layout.buckets, self._buffers,
                                                                  self._bucket_params)
                         for pair in self._master_pairs(bucket, buffers, members)]
        self._master_versions = [param._version for param, _, _ in self._masters]
        shards = {id(shard) for shard in self._shards}
        self._shard_masters = [index for index, (tracked, _, _) in enumerate(self._masters) if id(tracked) in shards]
        device = self.layout.buckets[0].device if self.layout.buckets else torch.device("cpu")
        chunk_bytes = [self.vote_rule.packed_planes * bucket.padded_numel // self.ranks_per_node // 8
                       for bucket in self.layout.buckets]
        self._exchange = make_exchange(self.exchange_name, self.topology.vote_group, chunk_bytes,
                                       self.vote_rule.planes, device, self.comm_stats, self.timeout)
        self._node = make_node(self.topology, self.comm_stats, device, self.timeout)
        # FSDP's shards: each rank sees the non-finite values of its own shards only, so a replica's ranks
        # agree on a skip as a node's do
        groups = shard_groups(params)
        self._shard_agreement = [NodeCollectives(group, dist.get_rank(group), self.comm_stats, self.timeout)
                                 for group in groups]
        self._shard_rank = dist.get_rank(groups[0]) if groups else None  # which shards this rank holds

    def _allocate_staging(self) -> dict[torch.device, list[Tensor]]:
        """Two whole-bucket gradient buffers per device, for the node's reduce-scatter (ranks_per_node > 1).

        Bucket i uses buffer i % 2, so bucket i + 2 is gathered while bucket i + 1 is reduced:
        the node's gradients take two buckets of memory, not the whole model's.
        """
        if self.ranks_per_node == 1:
            return {}
        largest: dict[torch.device, int] = {}
        for bucket in self.layout.buckets:
            largest[bucket.device] = max(largest.get(bucket.device, 0), bucket.padded_numel)
        return {device: [torch.zeros(n, dtype=self.defaults["reduce_dtype"], device=device) for _ in range(2)]
                for device, n in largest.items()}

    def _allocate(self, bucket: Bucket, staging: dict[torch.device, list[Tensor]]) -> _BucketBuffers:
        n, dev = bucket.padded_numel, bucket.device
        chunk = n // self.ranks_per_node
        low_precision = bucket.dtype in _LOW_PRECISION and self.defaults["master_weights"]
        scaled = self.param_groups[bucket.group_index]["vote_ema_beta"] is not None
        sharded = self.ranks_per_node > 1
        grad_dtype = self.defaults["reduce_dtype"] if sharded else bucket.dtype
        index = len(self._buffers)
        staged = self._staging is not None
        return _BucketBuffers(
            params=None if staged else torch.zeros(n, dtype=bucket.dtype, device=dev),
            node_grads=staging[dev][index % 2][:n] if sharded else None,
            grads=None if staged else torch.zeros(chunk, dtype=grad_dtype, device=dev),
            momentum=torch.zeros(chunk, dtype=self.defaults["momentum_dtype"], device=dev),
            bits=torch.zeros(self.vote_rule.packed_planes * chunk // 8, dtype=torch.uint8, device=dev),
            master=torch.zeros(chunk, dtype=torch.float32, device=dev) if low_precision else None,
            vote_ema=torch.zeros(chunk, dtype=torch.float32, device=dev) if scaled else None,
        )

    def _chunk_views(self, chunk: Tensor | None, bucket: Bucket) -> list[Tensor | None]:
        """Each parameter's part of a chunk buffer: shaped like it when the chunk is the whole bucket,
        else the flat slice of it that falls in this rank's chunk (empty for a parameter outside it)."""
        if chunk is None:
            return [None] * len(bucket.slots)
        if self.ranks_per_node == 1:
            return slot_views(chunk, bucket)
        return [chunk[lo:hi] for lo, hi, _ in self._chunk_ranges(bucket, chunk.numel())]

    def _chunk_ranges(self, bucket: Bucket, chunk_numel: int) -> list[tuple[int, int, int]]:
        """Per parameter of ``bucket``: (start, end) of its part in this rank's chunk, and where that part
        starts in the parameter (an empty part for a parameter outside the chunk)."""
        lo = self.topology.local_rank * chunk_numel
        ranges = []
        for slot in bucket.slots:
            start, end = max(slot.offset, lo), min(slot.offset + slot.numel, lo + chunk_numel)
            ranges.append((start - lo, max(start, end) - lo, start - slot.offset))
        return ranges

    def _master_pairs(self, bucket: Bucket, buffers: _BucketBuffers, members: list[Tensor]) -> list[tuple]:
        """(what counts the parameter's in-place changes, its master weights, the part of the parameter they
        hold) for a bucket with masters. A DTensor's changes show in its local shard's version."""
        if buffers.master is None:
            return []
        masters = [self.state[param]["master"] for param in members]
        versioned = [self._shard_of.get(id(param), param) for param in members]
        if self.ranks_per_node == 1:
            return [(tracked, master, tracked.data) for tracked, master in zip(versioned, masters)]
        return [(tracked, master, tracked.data.view(-1)[first:first + master.numel()])
                for tracked, master, (_, _, first) in zip(versioned, masters,
                                                          self._chunk_ranges(bucket, buffers.master.numel()))]

    def _follow_parameter_changes(self, compare_all: bool) -> None:
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

    def _layout_is_current(self) -> bool:
        params = self._params_in_order()
        return [local_tensor(p).data_ptr() for p in params] == self._data_ptrs and \
            [p.requires_grad for p in params] == self._requires_grad

    def _ensure_layout(self) -> None:
        """Re-lay out if the parameters were moved, replaced, frozen or unfrozen since the layout was built.

        Wrappers move and replace them: ``model.to(device)`` after the optimizer was built,
        or DeepSpeed swapping in fp32 copies of bf16 parameters. ``requires_grad`` set to
        False takes a parameter out of the buckets (it stays still, as in torch.optim), set
        to True puts it in (with zero momentum). Momentum is carried over by parameter
        position, and a state loaded meanwhile is applied now. Every rank must make the same
        change before the same step: the re-layout is checked with a collective.
        """
        if self._layout_is_current():
            return
        logger.info("DistLion: parameters were moved, replaced, frozen or unfrozen; rebuilding the bucket layout")
        params = self._params_in_order()
        previous = {index: {key: value.to(params[index].device).clone() for key, value in self.state[old].items()}
                    for index, old in enumerate(self._laid_out) if index < len(params) and old in self.state}
        self.state.clear()
        if self._new_layout().signature() != self.layout.signature():
            # Other shapes, dtypes or frozen parameters: every rank must have made the same change.
            # Moved storage alone keeps the layout, and a rank may move its parameters on its own.
            groups = [g for g in (self.topology.vote_group, self.topology.node_group) if g is not None]
            self._check_agreement(groups, self.world_size, self.ranks_per_node)
        self._build(previous)
        if self._pending_tensors is not None:
            self._load_tensors(self._pending_tensors)
            self._pending_tensors = None
        self._follow_parameter_changes(compare_all=True)  # new values beat carried master weights

    # -------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Exchange signs, vote, and apply the voted update on every rank.

        Returns the closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_layout()
        self._follow_parameter_changes(compare_all=False)
        self._copy_in_shards()
        self._check_scaled_groups()
        step = self._step + 1
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step
        found_inf = getattr(self, "found_inf", None)
        watching = self._averaged_check.watching(step)
        gradients_nonzero = watching and self._gradients_nonzero()
        # Inside a node, launch the reduce-scatter of the first two buckets; each later one
        # is launched as soon as the bucket two before it is packed and its staging buffer free.
        for index in range(min(2, len(self._buffers)) if self.ranks_per_node > 1 else 0):
            self._reduce_start(index, grad_scale)
        # Pack every bucket and launch its exchange; bucket i's bytes travel while i+1 is packed.
        for index, bucket in enumerate(self.layout.buckets):
            flag = self._pack(index, step, grad_scale)
            if self.ranks_per_node > 1 and index + 2 < len(self._buffers):
                self._reduce_start(index + 2, grad_scale)
            if found_inf is not None:
                flag = flag | (found_inf.to(flag.device) > 0)
            self._exchange.start(index, self._buffers[index].bits, flag.to(torch.uint8))
        # Vote on every bucket; the flags arrive with the signs, so the skip is decided here
        # while the voted bits of the two-phase exchange are still on their way.
        vote = self.vote_rule.kernel(step)
        if watching:
            vote = self._averaged_check.wrap(vote)
        skip = None
        for index in range(len(self._buffers)):
            any_nonfinite = self._exchange.vote(index, vote)
            skip = any_nonfinite if skip is None else skip | any_nonfinite
        if skip is not None:
            skip = self._node.agree(skip)  # chunk j's voters know of chunk j; the node ORs the chunks
            for shards in self._shard_agreement:
                skip = shards.agree(skip)
        if watching:
            self._averaged_check.end_step(gradients_nonzero)
        self.comm_stats.steps += 1
        self.comm_stats.allreduce_fp32_bytes += ring_allreduce_bytes(4 * self.layout.numel, self.world_size)
        # DeepSpeed's engine reads ``overflow`` to count skips and hold its LR scheduler.
        self.overflow = skip is not None and bool(skip)
        if self.overflow:
            for index in range(len(self._buffers)):
                self._exchange.finish(index)  # collect the votes in flight; nothing is applied
            self._record_skip(step)
            return loss
        # Apply each bucket as its votes arrive, while the next bucket's are still travelling;
        # then the node gathers the updated chunks.
        for index, (bucket, buffers) in enumerate(zip(self.layout.buckets, self._buffers)):
            voted = self._exchange.finish(index)
            group = self.param_groups[bucket.group_index]
            if self._staging is not None:
                self._apply_staged(index, voted, step, grad_scale)
                continue
            if self._momentum_in_pack(buffers):
                self._swap_momentum(index)
            else:
                kernels_for(bucket.device).update_momentum(buffers.grads, buffers.momentum, beta2=group["betas"][1])
            self.vote_rule.apply(self.topology.chunk(buffers.params), voted, lr=group["lr"],
                                 weight_decay=group["weight_decay"], master=buffers.master,
                                 vote_ema=buffers.vote_ema, beta=group["vote_ema_beta"], step=step)
            self._node.gather_start(index, buffers.params)
        self._node.gather_finish()
        self._copy_out_shards()
        if self._momentum_sync.due(step):
            self._momentum_sync.sync([buffers.momentum for buffers in self._buffers])
        if self.defaults["momentum_dtype"] == torch.float16 and not self._warned_momentum:
            self._check_momentum_range(step)
        self._step = step
        return loss

    def _votes_on_parameters(self) -> bool:
        """True when the coordinates this rank votes on include parameters, not bucket padding only (a tiny
        model's last chunk can be all padding, whose signs every voter packs alike)."""
        for bucket in self.layout.buckets:
            start = self.topology.local_rank * (bucket.padded_numel // self.ranks_per_node)
            if self.exchange_name == "two_phase":  # this voter's share of its node chunk
                start += self.topology.node * (bucket.padded_numel // self.ranks_per_node // self.topology.nodes)
            if start < bucket.numel:
                return True
        return False

    def _gradients_nonzero(self) -> bool:
        """True when this rank has a non-zero gradient (read on the first few steps only)."""
        return any(grad is not None and bool(grad.any())
                   for index in range(len(self._buffers)) for grad in self._bucket_grads(index))

    def _reduce_start(self, index: int, grad_scale: Tensor | None) -> None:
        """Gather the bucket's local gradients into its staging buffer and launch the node's reduce-scatter."""
        buffers = self._buffers[index]
        gather_into(self._bucket_grads(index), self._gather_views[index])
        if grad_scale is not None:
            buffers.node_grads.mul_(grad_scale.double().reciprocal().float())
        self._node.reduce_start(index, buffers.node_grads, buffers.grads)

    def _pack(self, index: int, step: int, grad_scale: Tensor | None) -> Tensor:
        """Pack the bucket's local signs into its bits; return its non-finite flag.

        The new momentum goes into the gradient buffer when the dtypes allow (swapped in
        once the step is agreed); the C kernels read p.grad in place when a node is one rank.
        """
        buffers, bucket = self._buffers[index], self.layout.buckets[index]
        kernels = kernels_for(bucket.device)
        beta1, beta2 = self.param_groups[bucket.group_index]["betas"]
        if self._staging is not None:
            return self._pack_staged(index, step, grad_scale)
        if self.ranks_per_node > 1:
            self._node.reduce_finish(index)  # buffers.grads now holds the node's mean gradient
        elif self._momentum_in_pack(buffers) and grad_scale is None:
            return kernels.pack_grads_and_momentum(self._bucket_grads(index), self._gather_views[index],
                                                   buffers.momentum, buffers.bits, buffers.grads, beta1=beta1,
                                                   beta2=beta2, parity=step % 2)
        else:
            gather_into(self._bucket_grads(index), self._gather_views[index])
            if grad_scale is not None:
                buffers.grads.mul_(grad_scale.double().reciprocal().float())
        if self.vote_rule.ternary:
            return self.vote_rule.pack(buffers.grads, buffers.momentum, buffers.bits, beta1=beta1)
        if self._momentum_in_pack(buffers):
            return kernels.pack_signs_and_momentum(buffers.grads, buffers.momentum, buffers.bits, buffers.grads,
                                                   beta1=beta1, beta2=beta2, parity=step % 2)
        return kernels.pack_signs_and_check(buffers.grads, buffers.momentum, buffers.bits, beta1=beta1,
                                            parity=step % 2)

    def _pack_staged(self, index: int, step: int, grad_scale: Tensor | None) -> Tensor:
        """Pack the signs of a bucket of FSDP2 shards piece by piece; the momentum is updated at apply."""
        buffers, bucket = self._buffers[index], self.layout.buckets[index]
        kernels = kernels_for(bucket.device)
        beta1 = self.param_groups[bucket.group_index]["betas"][0]
        grads = self._bucket_grads(index)
        flag = None
        for piece in self._staging.pieces[index]:
            piece_grads = self._staging.gather(index, piece, grads, bucket, grad_scale)
            nonfinite = kernels.pack_signs_and_check(piece_grads, buffers.momentum[piece.lo:piece.hi],
                                                     buffers.bits[piece.lo // 8:piece.hi // 8], beta1=beta1,
                                                     parity=step % 2)
            flag = nonfinite if flag is None else flag | nonfinite
        return flag

    def _apply_staged(self, index: int, voted: Tensor, step: int, grad_scale: Tensor | None) -> None:
        """Update a bucket of FSDP2 shards piece by piece: the momentum from the gradients gathered
        again, then the parameters (or their masters) from the vote, copied back into the shards."""
        buffers, bucket = self._buffers[index], self.layout.buckets[index]
        kernels = kernels_for(bucket.device)
        group = self.param_groups[bucket.group_index]
        grads = self._bucket_grads(index)
        for piece in self._staging.pieces[index]:
            lo, hi = piece.lo, piece.hi
            kernels.update_momentum(self._staging.gather(index, piece, grads, bucket, grad_scale),
                                    buffers.momentum[lo:hi], beta2=group["betas"][1])
            values = self._staging.load(index, piece, bucket)
            self.vote_rule.apply(values, voted[:, lo // 8:hi // 8].contiguous(), lr=group["lr"],
                                 weight_decay=group["weight_decay"],
                                 master=None if buffers.master is None else buffers.master[lo:hi],
                                 vote_ema=None if buffers.vote_ema is None else buffers.vote_ema[lo:hi],
                                 beta=group["vote_ema_beta"], step=step)
            self._staging.store(index, piece, values)

    def _check_scaled_groups(self) -> None:
        """Raise before any exchange if a group turned vote_ema_beta on after its buffers were built."""
        for bucket, buffers in zip(self.layout.buckets, self._buffers):
            beta = self.param_groups[bucket.group_index]["vote_ema_beta"]
            if beta is not None and buffers.vote_ema is None:
                raise RuntimeError(f"param group {bucket.group_index} has vote_ema_beta={beta!r} but was built "
                                   f"without it: pass vote_ema_beta when building DistLion (or in the group).")

    def _momentum_in_pack(self, buffers: _BucketBuffers) -> bool:
        """True when the pack pass can write the new momentum over the gradient buffer (same dtype;
        never when staged, where the gradient buffer is a piece of scratch, nor for Lion-K's ternary
        rules, whose pack is composed of torch ops and leaves the momentum to ``update_momentum``)."""
        return buffers.grads is not None and buffers.grads.dtype == buffers.momentum.dtype and \
            not self.vote_rule.ternary

    def _swap_momentum(self, index: int) -> None:
        """Make the gradient buffer, which holds the new momentum, the momentum; the old one is scratch.

        Done only once every rank agreed to take the step, so a skipped step leaves the
        momentum untouched without a second momentum buffer or an extra pass over memory.
        """
        buffers = self._buffers[index]
        buffers.grads, buffers.momentum = buffers.momentum, buffers.grads
        self._grad_views[index], self._momentum_views[index] = self._momentum_views[index], self._grad_views[index]
        if buffers.node_grads is None:
            self._gather_views[index] = self._grad_views[index]  # gradients are gathered into the chunk itself
        for param, momentum in zip(self._bucket_params[index], self._momentum_views[index]):
            self.state[param]["exp_avg"] = momentum

    def _bucket_grads(self, index: int) -> list[Tensor | None]:
        """Return the gradients of the bucket's parameters in layout order (None where missing)."""
        grads = [local_grad(param) for param in self._bucket_params[index]]
        for param, grad in zip(self._bucket_params[index], grads):
            if grad is not None and grad.is_sparse:
                raise RuntimeError(f"DistLion does not support sparse gradients (parameter of shape "
                                   f"{tuple(param.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)")
        return grads

    def _check_momentum_range(self, step: int) -> None:
        """Report once a float16 momentum that overflowed: its coordinates would drift by lr every step."""
        for index, buffers in enumerate(self._buffers):
            if not bool(torch.isfinite(buffers.momentum).all()):
                logger.warning("DistLion: the float16 momentum of bucket %d overflowed to inf/nan at step %d; "
                               "those coordinates now move by lr every step. Use momentum_dtype=torch.bfloat16 "
                               "(float32's range) or torch.float32.", index, step)
                self._warned_momentum = True
                return

    def _record_skip(self, step: int) -> None:
        self.comm_stats.skipped_steps += 1
        if not self._warned_skip:
            logger.warning("DistLion: non-finite gradient on at least one rank at step %d; every rank skipped "
                           "the step (no momentum update, no decay). Further skips are counted in "
                           "comm_stats.skipped_steps.", step)
            self._warned_skip = True

    # ------------------------------------------------------------ monitoring

    @torch.no_grad()
    def constraint_stats(self) -> dict:
        """Where the parameters stand against the box weight decay keeps them in (``distlion.constraint``).

        Lion with weight decay lambda solves min f(x) s.t. ||lambda * x||_inf <= 1: first
        the coordinates outside the box decay into it ("decaying", at least by
        (1 - lr*lambda) per step), then the iterate minimises f inside it ("inside"). Per
        param group: ||x||_inf, ||lambda * x||_inf, the coordinates outside, the phase, a
        bound on the steps left to reach the box at the current lr, and the previous call's
        ||lambda * x||_inf; a group with weight decay 0 has no box ("unbounded"). Returns
        ``distlion.constraint.overall``'s dict (JSON-ready).

        Cheap: one pass over the parameters, one host sync. With FSDP2 parameters it reduces
        over the shard group (every rank must call it); otherwise it is local, and every
        replica gets the same numbers.
        """
        groups = measure(self.param_groups, self._constraint_previous, self.timeout)
        self._constraint_previous = [group.scaled_max for group in groups]
        return overall(groups)

    # ------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """Return this rank's state: its own momentum plus what loading needs to verify it.

        Momentum differs on every rank, so save one file per rank, e.g. with torchrun::

            torch.save(opt.state_dict(), f"{ckpt}/distlion_rank{dist.get_rank()}.pt")

        With ``ranks_per_node > 1`` it holds this rank's chunk of the state only.
        """
        # Indexed by parameter position in the layout, not by parameter object: a wrapper
        # may have moved or replaced the parameters since (no re-layout here, it would
        # turn the parameters back into bucket views while the wrapper is still at work).
        groups, start = [], 0
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        tensors = self._pending_tensors  # loaded, not yet applied: they are the current state
        if tensors is None:
            tensors = {i: dict(self.state[p]) for i, p in enumerate(self._laid_out) if p in self.state}
        state = {"state": tensors, "param_groups": groups}
        state["distlion"] = {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "ranks_per_node": self.ranks_per_node,
            "layout": self.layout.signature(),
            "vote": self.vote,
            "step": self._step,
            "comm_stats": self.comm_stats.as_dict(),
        }
        if self._shard_rank is not None:
            state["distlion"]["shard_rank"] = self._shard_rank
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()`` on this rank, checking it belongs here.

        If the parameters were moved or replaced since the layout was built, the tensors
        are applied by the re-layout at the next ``step()`` (or ``state_dict()``), so the
        parameters are not re-laid out while a wrapper may still be loading their values.
        """
        meta = state_dict.get("distlion")
        if meta is None:
            raise ValueError("This optimizer state was not saved by DistLion (no 'distlion' section). DistLion "
                             "keeps different momentum on every rank: load the state this rank saved.")
        saved_nodes = (meta["world_size"], meta.get("ranks_per_node", 1))
        if saved_nodes != (self.world_size, self.ranks_per_node):
            raise ValueError(f"DistLion state was saved with world size {saved_nodes[0]} and ranks_per_node "
                             f"{saved_nodes[1]}, but this run has world size {self.world_size} and ranks_per_node "
                             f"{self.ranks_per_node}. Momentum is per rank (per chunk of a node) and cannot be "
                             f"re-split: resume with world size {saved_nodes[0]} and ranks_per_node={saved_nodes[1]}, "
                             f"or start the optimizer fresh.")
        if meta["rank"] != self.rank:
            raise ValueError(f"DistLion state of rank {meta['rank']} was given to rank {self.rank}: "
                             f"load the file this rank saved.")
        if meta.get("shard_rank") != self._shard_rank:
            raise ValueError(f"DistLion state of the FSDP shards of shard rank {meta.get('shard_rank')} was given "
                             f"to shard rank {self._shard_rank}: load the file this rank saved (name it by "
                             f"dist.get_rank(), which tells the shards apart).")
        current = self._new_layout()
        if meta["layout"] != current.signature():
            raise ValueError(f"DistLion state layout {meta['layout'][:12]} does not match this optimizer's "
                             f"({current.describe()}): the model or param groups differ from the saved run.")
        if meta.get("vote", self.vote) != self.vote:
            raise ValueError(f"DistLion state was saved with vote={meta['vote']!r}, this optimizer has "
                             f"vote={self.vote!r}.")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            try:
                check_hyperparameters(saved["lr"], saved["betas"], saved["weight_decay"], saved.get("vote_ema_beta"))
            except (KeyError, ValueError) as error:
                raise ValueError(f"DistLion state has a bad param group {index}: {error}") from None
            if (saved.get("vote_ema_beta") is None) != (group["vote_ema_beta"] is None):
                raise ValueError(f"DistLion state was saved with vote_ema_beta={saved.get('vote_ema_beta')!r} in "
                                 f"param group {index}, this optimizer has {group['vote_ema_beta']!r}: build it "
                                 f"with the saved setting (the scaled step keeps a per-coordinate EMA).")
        self._check_saved_tensors(state_dict["state"])
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
        if self._layout_is_current():
            self._load_tensors(state_dict["state"])
        else:
            self._pending_tensors = state_dict["state"]
        self._step = int(meta["step"])
        self.comm_stats.load(meta.get("comm_stats", {}))

    def _check_saved_tensors(self, saved: dict) -> None:
        """Raise unless ``saved`` holds, for every laid-out parameter, each state tensor with its exact shape,
        a floating dtype and finite values (a NaN momentum would move its coordinate by lr forever)."""
        expected = {index: self.state[param] for index, param in enumerate(self._laid_out) if param in self.state}
        if not isinstance(saved, dict):
            raise ValueError(f"DistLion state's 'state' is a {type(saved).__name__}, not a dict of tensors")
        for index, state in expected.items():
            entry = saved.get(index, saved.get(str(index)))
            if not isinstance(entry, dict) or set(entry) != set(state):
                found = sorted(entry) if isinstance(entry, dict) else entry
                raise ValueError(f"DistLion state of parameter {index} (shape {tuple(self._laid_out[index].shape)}) "
                                 f"holds {found}, expected {sorted(state)}: the file is incomplete or not this "
                                 f"optimizer's")
            for key, target in state.items():
                value = entry[key]
                if not isinstance(value, Tensor) or value.shape != target.shape or not value.is_floating_point():
                    described = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor)
                                 else type(value).__name__)
                    raise ValueError(f"DistLion state '{key}' of parameter {index} is {described}, expected a "
                                     f"floating tensor of shape {tuple(target.shape)}")
                if not torch.isfinite(value).all():
                    raise ValueError(f"DistLion state '{key}' of parameter {index} holds inf or nan: the saved "
                                     f"run had overflowed (e.g. an fp16 momentum) or the file is damaged; load "
                                     f"an earlier checkpoint or start the optimizer fresh")

    def _load_tensors(self, saved: dict) -> None:
        """Copy saved per-parameter tensors (momentum, master weights) into the buckets."""
        params = self._params_in_order()
        for index, saved_state in saved.items():
            target = self.state[params[int(index)]]
            for key, value in saved_state.items():
                if key in target:
                    target[key].copy_(value)


# --------------------------------------------------------------------- helpers

def _check_lion_k(k: Any, threshold: Any, fraction: Any) -> None:
    """Raise a ValueError naming a bad Lion-K option and the fix."""
    if k not in K_RULES:
        raise ValueError(f"Invalid k: {k!r}; use one of {K_RULES} ('sign': Lion, 1 bit per coordinate; "
                         f"'dead_zone' and 'top': Lion-K's ternary update, 2 bits)")
    if not (is_real_number(threshold) and 0 <= threshold < math.inf):
        raise ValueError(f"Invalid k_threshold: {threshold!r}; use a finite number >= 0 (k='dead_zone' moves the "
                         f"coordinates with |c| > k_threshold * mean |c| of the bucket; 0: every non-zero c)")
    if not (is_real_number(fraction) and 0 < fraction <= 1):
        raise ValueError(f"Invalid k_fraction: {fraction!r}; use a number in (0, 1] (k='top' moves that fraction "
                         f"of each bucket's coordinates, those of largest |c|; 1: all)")


def _resolve_group(process_group: Any) -> Any:
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None
