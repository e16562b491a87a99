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
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from distlion import layouts
from distlion.averaged import AveragedGradientsCheck
from distlion.buckets import BucketLayout, build_layout
from distlion import agreement
from distlion.checks import check_hyperparameters, check_parameters, disagreement
from distlion.comm import CommStats, choose_exchange, make_exchange, ring_allreduce_bytes
from distlion.constraint import measure, overall
from distlion.local_shards import check_sharded_parameters, is_sharded, local_param_groups
from distlion.momentum_sync import MomentumSync
from distlion.skips import SkipReport
from distlion.options import FIELDS, SHARED_KEYS, DistLionOptions, dtype_name, signature
from distlion.state_checks import check_saved_group, check_saved_meta, check_saved_tensors
from distlion.topology import data_parallel_group, resolve
from distlion.vote import VoteRule

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class DistLion(torch.optim.Optimizer):
    """Lion whose update is the vote of every data-parallel rank's (or node's) 1-bit sign.

    Args:
        params: parameters or param groups (groups may set lr, betas, weight_decay,
            vote_ema_beta).
        lr, betas, weight_decay, vote, exchange, process_group, bucket_cap_mb,
        master_weights, momentum_dtype, vote_ema_beta, ranks_per_node, node_group,
        reduce_dtype, timeout, device_mesh, k, k_threshold, k_fraction,
        momentum_sync_every: keyword options, each described once in
            ``distlion.options.DistLionOptions`` (README's options table). In short:
            ``ranks_per_node=G`` makes a node of G ranks vote as one worker;
            ``device_mesh`` votes across an FSDP2 mesh's "replicate" dim;
            ``vote_ema_beta`` scales each coordinate's step by its vote's squared,
            bias-corrected EMA; ``k`` picks Lion-K's ternary update; ``timeout`` bounds
            every collective, after which every waiting rank raises ``CollectiveError``.

    ``step()`` runs the same stages on every layout: pack -> exchange -> vote -> apply ->
    gather; the layout (``distlion.layouts``: flat buckets, node chunks or FSDP2 shards) is
    chosen once, here, and re-built only when the parameters are moved, replaced, frozen
    or unfrozen.

    Example::

        opt = DistLion(model.parameters(), lr=1e-4, weight_decay=0.1)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    # GradScaler calls step() on every rank and hands over ``grad_scale`` and
    # ``found_inf``, so a skip can be agreed by all ranks instead of decided per rank.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, **options: Any):
        self.options = DistLionOptions(lr=lr, betas=betas, weight_decay=weight_decay, **_known(options))
        super().__init__(params, self.options.defaults())  # add_param_group checks each group
        opts = self.options
        self.device_mesh = opts.device_mesh
        self.process_group = data_parallel_group(opts)
        self.timeout = opts.timeout_delta
        self.vote, self.k = opts.vote, opts.k
        self.comm_stats = CommStats()
        self._step = 0
        self.checkpoint_run: str | None = None  # the id of this run's checkpoints (distlion.checkpoint.files)
        self.overflow = False  # True after a step that every rank skipped
        self._warned_momentum = False  # a float16 momentum's overflow is reported once
        self._pending_tensors: dict | None = None  # loaded before a re-layout, applied by it
        self._constraint_previous: list[float | None] | None = None  # ||lambda x||_inf per group, last measured
        self.topology = resolve(opts, self.process_group, self._params_in_order(), self._agree_or_raise)
        self.world_size, self.rank = self.topology.world_size, self.topology.rank
        self.ranks_per_node = self.topology.ranks_per_node
        self.vote_rule = VoteRule(opts.vote, self.topology.nodes, opts.k, opts.k_threshold, opts.k_fraction)
        if self.vote_rule.ternary and any(is_sharded(p) for p in self._params_in_order()):
            raise ValueError(f"k={opts.k!r} with parameters sharded by FSDP2 is not supported: DistLion stages "
                             f"FSDP's shards piece by piece, and the ternary rules need a whole bucket's |c| at "
                             f"once. Use k='sign' with FSDP2, or k={opts.k!r} without FSDP (plain or "
                             f"ranks_per_node).")
        self.exchange_name = choose_exchange(opts.exchange, self.topology.nodes)
        self.comm_stats.ranks_per_node = self.ranks_per_node
        self._skips = SkipReport(self.comm_stats, self.rank)
        self._momentum_sync = MomentumSync(opts.momentum_sync_every, self.topology.vote_group, self.topology.nodes,
                                           self.comm_stats, self.timeout)
        self._build(previous=None)
        self._averaged_check = AveragedGradientsCheck(self.topology.nodes, self.comm_stats,
                                                      judges=self.layout.votes_on_parameters(self.exchange_name))
        self.layout.broadcast_from_first()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (laid out at the next ``step()``), checking its values and parameters."""
        for key in ("momentum_dtype", "reduce_dtype"):  # by name, as the defaults hold them
            if isinstance(param_group.get(key), torch.dtype):
                param_group = {**param_group, key: dtype_name(param_group[key], key)}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group["lr"], group["betas"], group["weight_decay"], group["vote_ema_beta"])
            for key in SHARED_KEYS:
                if group[key] != self.defaults[key]:
                    raise ValueError(f"{key} must be the same for all param groups; got {group[key]!r} "
                                     f"in a group and {self.defaults[key]!r} for the optimizer")
            check_parameters(self._params_in_order())
            if getattr(self, "topology", None) is not None:  # set once __init__ resolved the nodes
                check_sharded_parameters(group["params"], self.topology.vote_group, self.ranks_per_node)
        except ValueError:
            self.param_groups.pop()  # the optimizer stays as it was
            raise

    def _agree_or_raise(self, groups: list[Any], world_size: int, ranks_per_node: int) -> None:
        """Raise on every rank of ``groups`` if any of them laid out other parameters or nodes, or differs in
        a setting that must match (lr, betas, weight decay, vote, ...): replicas would drift apart. Every
        group is asked before anyone raises, so no rank is left waiting in a later group's check."""
        self._raise_disagreements(groups, self._new_plan(world_size), ranks_per_node,
                                  self.options.agreed_settings(self.param_groups))

    def _raise_disagreements(self, groups: list[Any], plan: BucketLayout, ranks_per_node: int,
                             settings: dict[str, Any], otherwise: str | None = None) -> None:
        """Raise what differs in ``plan`` or ``settings`` within any of ``groups`` (all asked first); else raise
        ``otherwise``, when given (a difference seen elsewhere)."""
        problems = [disagreement(plan, group, ranks_per_node, settings, self.timeout) for group in groups]
        found = [problem for problem in problems if problem is not None]
        if found or otherwise:
            raise RuntimeError("\n".join(found) if found else otherwise)

    def _groups(self) -> list[Any]:
        """The process groups this rank shares a vote with: its vote group and its node's."""
        return [g for g in (self.topology.vote_group, self.topology.node_group) if g is not None]

    # ------------------------------------------------------------------ layout

    def _params_in_order(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def steps_taken(self) -> int:
        """Steps applied so far (skipped steps not counted), as saved and loaded with the state."""
        return self._step

    def plan_for(self, world_size: int) -> BucketLayout:
        """The bucket plan of these parameters on ``world_size`` ranks (a saved run's, for a resume)."""
        return self._new_plan(world_size)

    def _new_plan(self, world_size: int | None = None) -> BucketLayout:
        """Lay out the parameters this rank holds (a DTensor's local shard) for ``world_size`` voters."""
        return build_layout(local_param_groups(self.param_groups), world_size or self.world_size,
                            self.options.bucket_cap_mb)

    def _build(self, previous: dict[int, dict[str, Tensor]] | None) -> None:
        """Choose and allocate the layout, and the exchange sized for its buckets; ``previous`` maps param
        index to state tensors to carry over (a re-layout), None starts from zero momentum."""
        self.layout = layouts.build(self.param_groups, self._new_plan(), self.options, self.topology,
                                    self.vote_rule, self.comm_stats, self.state, previous)
        self._laid_out = self._params_in_order()
        self._signature = self.layout.plan.signature()
        buckets = self.layout.buckets
        device = buckets[0].device if buckets else torch.device("cpu")
        quorum = self.options.quorum
        if quorum is not None:  # voters that change from step to step (distlion.torchft)
            self._exchange = quorum.exchange(self.layout.chunk_bytes(), self.vote_rule.planes, device,
                                             self.comm_stats)
        else:
            self._exchange = make_exchange(self.exchange_name, self.topology.vote_group, self.layout.chunk_bytes(),
                                           self.vote_rule.planes, device, self.comm_stats, self.timeout)

    def _ensure_layout(self, checked: bool = False) -> None:
        """Re-lay out if the parameters were moved, replaced, frozen or unfrozen since the layout was built.

        Wrappers move and replace them: ``model.to(device)`` after the optimizer was built,
        or DeepSpeed swapping in fp32 copies of bf16 parameters. ``requires_grad`` set to
        False takes a parameter out of the buckets (it stays still, as in torch.optim), set
        to True puts it in (with zero momentum). Momentum is carried over by parameter
        position, and a state loaded meanwhile is applied now. Every rank must make the same
        change before the same step: the re-layout is checked with a collective (``checked``: already
        agreed by ``_relayout_together``).
        """
        if self.layout.is_current():
            return
        logger.info("DistLion: parameters were moved, replaced, frozen or unfrozen; rebuilding the bucket layout")
        params = self._params_in_order()
        previous = {index: {key: value.to(params[index].device).clone() for key, value in self.state[old].items()}
                    for index, old in enumerate(self._laid_out) if index < len(params) and old in self.state}
        self.state.clear()
        if not checked and self._new_plan().signature() != self.layout.plan.signature():
            # Other shapes, dtypes or frozen parameters: every rank must have made the same change.
            # Moved storage alone keeps the layout, and a rank may move its parameters on its own.
            self._agree_or_raise(self._groups(), self.world_size, self.ranks_per_node)
        self._build(previous)
        if self._pending_tensors is not None:
            self._load_tensors(self._pending_tensors)
            self._pending_tensors = None
        self.layout.follow_parameter_changes(compare_all=True)  # new values beat carried master weights

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
        self._take_step()
        return loss

    def _take_step(self) -> None:
        """One step of the stages; after a re-layout asked for by some rank, the same gradients again."""
        relayout = self._layout_changed()  # asked of every rank in the headers, never done alone
        if not relayout:
            self._ensure_layout()  # moved storage only: a rank may re-lay out alone
        layout, exchange = self.layout, self._exchange
        layout.stale = relayout
        layout.follow_parameter_changes(compare_all=False)
        self._check_scaled_groups()
        step = self._step + 1
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step
        found_inf = getattr(self, "found_inf", None)
        watching = self._averaged_check.watching(step) and not relayout
        gradients_nonzero = watching and layout.gradients_nonzero()
        settings = agreement.step_settings(step, self.param_groups)
        voters_digest = agreement.digest({**settings, "layout": self._signature})
        buckets = range(len(layout.states))
        # pack every bucket and launch its exchange: bucket i's bytes travel while i+1 is packed
        layout.begin(grad_scale)
        for index in buckets:
            flags = layout.pack(index, step, grad_scale).to(torch.uint8) * agreement.NONFINITE
            if found_inf is not None:
                flags = flags | (found_inf.to(flags.device) > 0).to(torch.uint8) * agreement.NONFINITE
            if relayout:
                flags = flags | agreement.RELAYOUT
            exchange.start(index, layout.states[index].bits, agreement.header(flags, voters_digest))
        # vote on every bucket; the headers arrive with the signs, so the skip is decided here
        # while the voted bits of the two-phase exchange are still on their way
        vote = self.vote_rule.kernel(step, exchange.voters)
        if watching:
            vote = self._averaged_check.wrap(vote)
        rows = [exchange.vote(index, vote) for index in buckets]
        summary = agreement.summary(rows, agreement.digest(settings)) if rows else None
        status = dict(zip(agreement.SUMMARY, layout.agree(summary).tolist())) \
            if rows else dict.fromkeys(agreement.SUMMARY, 0)
        differs = status["differs"] or status["digest"] != -status["negated_digest"]  # voters, or a node's ranks
        # unless it re-lays out or raises below, the step ends here: a quorum (distlion.torchft) decides it now
        committed = True if differs or status["relayout"] else self._commit()
        if differs or status["relayout"] or status["nonfinite"] or not committed:
            for index in buckets:
                exchange.finish(index)  # collect the votes in flight; nothing is applied
        if status["relayout"]:  # first: the settings may differ only because the param groups did
            self._relayout_together()
            self._take_step()  # the same gradients, on the new layout
            return
        if differs:
            self._raise_disagreements(self._groups(), self.layout.plan, self.ranks_per_node,
                                      {**settings, "layout": self._signature},
                                      otherwise=f"DistLion: at step {step} the ranks differ in the step, lr, betas, "
                                                f"weight_decay, vote_ema_beta or layout (seen in another group of "
                                                f"ranks than this rank's): change them alike on every rank")
        self.comm_stats.steps += 1
        self.comm_stats.allreduce_fp32_bytes += ring_allreduce_bytes(4 * layout.plan.numel, self.world_size)
        if not committed:  # a voter failed during the step: nothing changes here, the quorum re-forms
            self.comm_stats.uncommitted_steps += 1
            return
        if watching:
            self._averaged_check.end_step(gradients_nonzero)
        # DeepSpeed's engine reads ``overflow`` to count skips and hold its LR scheduler.
        self.overflow = bool(status["nonfinite"])
        if self.overflow:
            self._skips.skipped(step, agreement.flagged(rows, agreement.NONFINITE), layout.nonfinite_here())
            return
        self._skips.applied()
        # apply each bucket as its votes arrive, while the next bucket's are still travelling; then gather
        for index in buckets:
            layout.apply(index, exchange.finish(index), step, grad_scale)
        layout.end()
        if self._momentum_sync.due(step):
            self._momentum_sync.sync(layout.momenta())
        if self.options.momentum_dtype == torch.float16 and not self._warned_momentum:
            self._check_momentum_range(step)
        self._step = step

    def _commit(self) -> bool:
        """Whether this step may be applied: always, unless a ``quorum`` says a voter failed during it."""
        return self.options.quorum is None or self.options.quorum.commit()

    def _layout_changed(self) -> bool:
        """True when this rank's parameters changed shape, dtype, order or requires_grad since the layout was
        built (moved storage alone keeps the layout): every rank must re-lay out at the same step."""
        return not self.layout.is_current() and self._new_plan().signature() != self.layout.plan.signature()

    def _relayout_together(self) -> None:
        """Re-lay out on every rank after some rank asked for it in its header; raise on every rank unless
        every rank made the same change (one all_gather per group, never paired with a sign exchange)."""
        self._agree_or_raise(self._groups(), self.world_size, self.ranks_per_node)
        self._ensure_layout(checked=True)

    def _check_scaled_groups(self) -> None:
        """Raise before any exchange if a group turned vote_ema_beta on after its buffers were built."""
        for state in self.layout.states:
            beta = self.param_groups[state.bucket.group_index]["vote_ema_beta"]
            if beta is not None and state.vote_ema is None:
                raise RuntimeError(f"param group {state.bucket.group_index} has vote_ema_beta={beta!r} but was "
                                   f"built without it: pass vote_ema_beta when building DistLion (or in the group).")

    def _check_momentum_range(self, step: int) -> None:
        """Report once a float16 momentum that overflowed: its coordinates would drift by lr every step."""
        for index, momentum in enumerate(self.layout.momenta()):
            if not bool(torch.isfinite(momentum).all()):
                logger.warning("DistLion: the float16 momentum of bucket %d overflowed to inf/nan at step %d; "
                               "those coordinates now move by lr every step. Use momentum_dtype=torch.bfloat16 "
                               "(float32's range) or torch.float32.", index, step)
                self._warned_momentum = True
                return

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
            "layout": self.layout.plan.signature(),
            "vote": self.vote,
            "step": self._step,
            "comm_stats": self.comm_stats.as_dict(),
        }
        if self.layout.shard_rank is not None:
            state["distlion"]["shard_rank"] = self.layout.shard_rank
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
        check_saved_meta(meta, self.world_size, self.ranks_per_node, self.rank, self.layout.shard_rank,
                         self._new_plan(), self.vote)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            check_saved_group(index, saved, group)
        laid_out = {i: self.state[p] for i, p in enumerate(self._laid_out) if p in self.state}
        check_saved_tensors(state_dict["state"], laid_out, {i: tuple(p.shape) for i, p in enumerate(self._laid_out)})
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key in ("momentum_dtype", "reduce_dtype") and isinstance(value, torch.dtype):
                    value = dtype_name(value, key)  # a state saved before dtypes were kept by name
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
        if self.layout.is_current():
            self._load_tensors(state_dict["state"])
        else:
            self._pending_tensors = state_dict["state"]
        self._step = int(meta["step"])
        self.comm_stats.load(meta.get("comm_stats", {}))

    def _load_tensors(self, saved: dict) -> None:
        """Copy saved per-parameter tensors (momentum, master weights) into the buckets."""
        params = self._params_in_order()
        for index, saved_state in saved.items():
            target = self.state[params[int(index)]]
            for key, value in saved_state.items():
                if key in target:
                    target[key].copy_(value)


def _known(options: dict[str, Any]) -> dict[str, Any]:
    """``options``, refusing a keyword DistLion does not take (with the list of those it takes)."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"DistLion got unexpected keyword argument(s) {unknown}; it takes {sorted(FIELDS)}")
    return options


DistLion.__init__.__signature__ = signature(DistLion.__init__)  # help() and inspect show every option
