"""DistLion's options: one frozen dataclass that validates every argument once.

Everything that lists DistLion's settings derives from ``DistLionOptions``' fields:
the cross-rank settings agreement (``agreed_settings``), the DeepSpeed config keys
(``CONFIG_KEYS``), ``launch.train``'s optimizer flags and README's options table (a test
compares each against the fields). A field's metadata says where it goes:

- ``doc``: one line for README's table and ``--help``;
- ``json``: a DeepSpeed config entry can hold it (process groups and meshes cannot);
- ``group``: a per-param-group value (lr, betas, weight_decay, vote_ema_beta);
- ``agreed``: every rank must hold the same value (the construction check compares it).

Dtype options take a ``torch.dtype`` or its name ("float32", "bfloat16"); the optimizer's
``defaults`` (and so ``state_dict()``'s ``param_groups``) hold the name, which
``torch.distributed.checkpoint`` can store.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

import torch

from distlion.checkpoint.elastic import RULES
from distlion.checks import check_hyperparameters, is_real_number
from distlion.comm.exchange import EXCHANGES
from distlion.momentum_sync import check_every
from distlion.topology import AUTO, check_ranks_per_node
from distlion.vote import K_RULES, VOTES

EXCHANGE_CHOICES = ("auto", *EXCHANGES)  # "auto": all_gather for 2 voters or fewer, else two_phase
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
TOPOLOGY_CHANGES = (*RULES, "refuse")


def _option(default: Any, doc: str, *, json: bool = True, group: bool = False, agreed: bool = True,
            parse: Any = None, choices: tuple | None = None) -> Any:
    """A field; ``parse`` turns a command-line string into its value (None: not a command-line flag)."""
    return field(default=default, metadata={"doc": doc, "json": json, "group": group, "agreed": agreed,
                                            "parse": parse, "choices": choices})


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"


def _parse_every(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _parse_ranks_per_node(text: str) -> int | str:
    return text if text == AUTO else int(text)


def dtype_name(dtype: Any, option: str) -> str:
    """The name of a floating ``dtype`` given as a ``torch.dtype`` or a name; raise naming the choices."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (torch.dtype, str)) else None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"Invalid {option}: {dtype!r}; use one of {FLOAT_DTYPES} (a torch.dtype or its name), "
                         f"or None for float32")
    return name


@dataclass(frozen=True)
class DistLionOptions:
    """Every DistLion argument but the parameters, checked once (errors name the value and the fix)."""

    lr: float = _option(1e-4, "learning rate (Lion wants 3-10x less than AdamW)", group=True)
    betas: tuple = _option((0.9, 0.99), "(beta1, beta2): the sign's interpolation and the momentum's decay",
                           group=True)
    weight_decay: float = _option(0.0, "decoupled weight decay (Lion wants 3-10x more than AdamW)", group=True)
    vote: str = _option("majority", "'majority': sign of the summed signs; 'average': their mean", parse=str,
                        choices=VOTES)
    exchange: str = _option("auto", "'two_phase', 'all_gather', or 'auto' (all_gather for 2 voters or fewer)",
                            parse=str, choices=EXCHANGE_CHOICES)
    process_group: Any = _option(None, "the data-parallel ranks; default: the world group when initialised",
                                 json=False, agreed=False)
    bucket_cap_mb: float = _option(25, "soft cap on a bucket in MiB of fp32; one collective per bucket",
                                   agreed=False, parse=float)
    master_weights: bool = _option(True, "keep fp32 copies of bf16/fp16 parameters and update those",
                                   parse=_parse_bool)
    momentum_dtype: Any = _option(None, "dtype of the momentum; None: float32", parse=str, choices=FLOAT_DTYPES)
    vote_ema_beta: Any = _option(None, "e.g. 0.9: scale each step by its vote's squared EMA; None: Lion's step",
                                 group=True)
    ranks_per_node: Any = _option(AUTO, "G ranks of a node vote as one worker; 'auto': LOCAL_WORLD_SIZE on "
                                        "several nodes, else 1", agreed=False,
                                  parse=_parse_ranks_per_node)
    node_group: Any = _option(None, "this node's ranks, built by the caller, instead of ranks_per_node",
                              json=False, agreed=False)
    reduce_dtype: Any = _option(None, "dtype of the node's gradient reduce-scatter; None: float32", parse=str,
                                choices=FLOAT_DTYPES)
    timeout: Any = _option(None, "seconds any collective may wait before every rank raises CollectiveError; "
                                 "None: the process group's", agreed=False, parse=float)
    device_mesh: Any = _option(None, "an FSDP2 (replicate, shard) mesh: the replicate dim votes",
                               json=False, agreed=False)
    k: str = _option("sign", "'sign': Lion, 1 bit; 'dead_zone' or 'top': Lion-K's ternary update, 2 bits",
                     parse=str, choices=K_RULES)
    k_threshold: float = _option(1.0, "k='dead_zone': move where |c| > k_threshold * mean |c| of the bucket",
                                 parse=float)
    k_fraction: float = _option(0.1, "k='top': the fraction of each bucket's coordinates that move",
                                parse=float)
    momentum_sync_every: Any = _option(32, "K: average the voters' momenta (bf16) every K steps; None: never "
                                           "(the vote's bytes alone)", parse=_parse_every)
    quorum: Any = _option(None, "voters that change from step to step: distlion.torchft's quorum of replica "
                                "groups; None: the process group's ranks", json=False, agreed=False)
    on_topology_change: str = _option("mean", "a checkpoint of another topology: how M saved voters' momenta "
                                              "become M' ('mean', 'modulo', 'mean_deviation'); 'refuse': raise",
                                      agreed=True, parse=str, choices=TOPOLOGY_CHANGES)

    def __post_init__(self):
        check_hyperparameters(self.lr, self.betas, self.weight_decay, self.vote_ema_beta)
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_choice("vote", self.vote, VOTES)
        _check_choice("exchange", self.exchange, EXCHANGE_CHOICES)
        _check_choice("k", self.k, K_RULES, "('sign': Lion, 1 bit per coordinate; 'dead_zone' and 'top': "
                                            "Lion-K's ternary update, 2 bits)")
        if not (is_real_number(self.bucket_cap_mb) and 0 < self.bucket_cap_mb < math.inf):
            raise ValueError(f"Invalid bucket_cap_mb: {self.bucket_cap_mb!r}; use a positive size in MiB, e.g. 25")
        if not isinstance(self.master_weights, bool):
            raise ValueError(f"Invalid master_weights: {self.master_weights!r}; use True or False")
        for name in ("momentum_dtype", "reduce_dtype"):
            value = getattr(self, name)
            object.__setattr__(self, name, getattr(torch, dtype_name(value, name)) if value is not None
                               else torch.float32)
        check_ranks_per_node(self.ranks_per_node)
        if self.timeout is not None and not (is_real_number(self.timeout) and 0 < self.timeout < math.inf):
            raise ValueError(f"Invalid timeout: {self.timeout!r}; use seconds > 0, or None for the process group's")
        if not (is_real_number(self.k_threshold) and 0 <= self.k_threshold < math.inf):
            raise ValueError(f"Invalid k_threshold: {self.k_threshold!r}; use a finite number >= 0 (k='dead_zone' "
                             f"moves the coordinates with |c| > k_threshold * mean |c| of the bucket; 0: every "
                             f"non-zero c)")
        if not (is_real_number(self.k_fraction) and 0 < self.k_fraction <= 1):
            raise ValueError(f"Invalid k_fraction: {self.k_fraction!r}; use a number in (0, 1] (k='top' moves that "
                             f"fraction of each bucket's coordinates, those of largest |c|; 1: all)")
        check_every(self.momentum_sync_every)
        _check_choice("on_topology_change", self.on_topology_change, TOPOLOGY_CHANGES,
                      "(how a resume on another number of voters maps their momenta; README, Checkpoints)")
        if self.quorum is not None:
            _check_quorum(self)
        if self.device_mesh is not None and (self.process_group is not None or self.node_group is not None):
            raise ValueError("pass device_mesh or process_group / node_group, not both: device_mesh's "
                             "'replicate' dim is the vote group")
        if self.node_group is not None and self.process_group is None:
            raise ValueError("node_group needs process_group: pass the group of the ranks that vote with this one "
                             "(the rank with the same place in every node), or pass ranks_per_node instead of "
                             "node_group")

    @property
    def timeout_delta(self) -> timedelta | None:
        return timedelta(seconds=self.timeout) if self.timeout is not None else None

    def defaults(self) -> dict[str, Any]:
        """The optimizer's ``defaults``: every per-group value and every optimizer-wide setting that a param
        group must repeat, with dtypes by name (so ``state_dict()`` holds no ``torch.dtype``)."""
        return {name: getattr(self, name) for name in GROUP_KEYS} | {
            name: dtype_name(value, name) if isinstance(value, torch.dtype) else value
            for name, value in ((name, getattr(self, name)) for name in SHARED_KEYS)}

    def agreed_settings(self, param_groups: list[dict]) -> dict[str, Any]:
        """What every rank must hold alike: the optimizer-wide settings and each param group's values."""
        settings = {name: getattr(self, name) for name in AGREED_KEYS}
        for index, group in enumerate(param_groups):
            for key in GROUP_KEYS:
                settings[f"param group {index} {key}"] = group[key]
            if "param_names" in group:  # given as model.named_parameters(): the order is checked by name
                settings[f"param group {index} parameter names"] = tuple(group["param_names"])
        return settings


def _check_quorum(options: DistLionOptions) -> None:
    """Raise for a ``quorum`` (voters that change by step) with a setting that needs a fixed voter count."""
    for name, value, works in (("vote", options.vote, "majority"), ("k", options.k, "sign")):
        if value != works:
            raise ValueError(f"{name}={value!r} with a quorum is not supported: the quorum's voter count changes "
                             f"from step to step, and only {name}={works!r} does not depend on it. Use "
                             f"{name}={works!r}.")
    if options.device_mesh is not None:
        raise ValueError("device_mesh with a quorum is not supported: pass the replica group's own process "
                         "group (process_group=..., ranks_per_node=its size); the quorum is the vote group")
    for method in ("exchange", "commit"):
        if not callable(getattr(options.quorum, method, None)):
            raise ValueError(f"Invalid quorum: {options.quorum!r} has no {method}(); build it with "
                             f"distlion.torchft (e.g. distlion.torchft.FaultTolerantDistLion)")


def _check_choice(name: str, value: Any, choices: tuple, hint: str = "") -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; use one of {choices}" + (f" {hint}" if hint else ""))


FIELDS = {f.name: f for f in fields(DistLionOptions)}
GROUP_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["group"])
# optimizer-wide settings every param group repeats (add_param_group refuses another value)
SHARED_KEYS = ("vote", "exchange", "bucket_cap_mb", "master_weights", "momentum_dtype", "reduce_dtype")
AGREED_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["agreed"] and not f.metadata["group"])
CONFIG_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["json"])
DTYPE_KEYS = ("momentum_dtype", "reduce_dtype")


def signature(init: Any) -> inspect.Signature:
    """``init(self, params, lr, betas, weight_decay, **options)``'s signature with each option spelled out."""
    head = list(inspect.signature(init).parameters.values())[:2]  # self, params
    spelled = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD if f.metadata["group"] and
                                 name != "vote_ema_beta" else inspect.Parameter.KEYWORD_ONLY, default=f.default)
               for name, f in FIELDS.items()]
    return inspect.Signature(head + spelled)


def add_flags(parser: Any, skip: tuple[str, ...] = ()) -> None:
    """Add a ``--NAME`` flag to ``parser`` (an argparse parser or group) for every option a command line can
    set, but those in ``skip``; ``from_flags`` reads them back."""
    for name, f in FIELDS.items():
        if f.metadata["parse"] is not None and name not in skip:
            parser.add_argument(f"--{name}", type=f.metadata["parse"], choices=f.metadata["choices"],
                                default=f.default, help=f"DistLion: {f.metadata['doc']}")


def from_flags(args: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The DistLion keyword arguments of the flags ``add_flags`` added (the same ``skip``)."""
    return {name: getattr(args, name) for name, f in FIELDS.items()
            if f.metadata["parse"] is not None and name not in skip}
