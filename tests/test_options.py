"""One options object: every list of DistLion's settings agrees with ``DistLionOptions``' fields."""

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from distlion import DistLion
from distlion.options import (AGREED_KEYS, CONFIG_KEYS, FIELDS, GROUP_KEYS, DistLionOptions, add_flags,
                              from_flags)

ROOT = Path(__file__).resolve().parents[1]


def readme_options_table() -> list[tuple[str, str]]:
    """(option, default) of each row of README's options table, in order."""
    text = (ROOT / "README.md").read_text()
    header = text.index("| option | default | meaning |")
    rows = []
    for line in text[header:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        match = re.match(r"\| `([a-z_0-9]+)` \| `(.*?)` \|", line)
        assert match, f"README options row not in the form | `name` | `default` | meaning |: {line}"
        rows.append((match.group(1), match.group(2)))
    return rows


def test_readme_options_table_lists_every_field_with_its_default():
    expected = [(f.name, repr(f.default)) for f in fields(DistLionOptions)]
    assert readme_options_table() == expected


def test_constructor_signature_spells_every_option():
    names = list(inspect.signature(DistLion).parameters)
    assert names == ["params", *FIELDS]
    assert all(inspect.signature(DistLion).parameters[name].default == f.default for name, f in FIELDS.items())


def test_launch_train_has_a_flag_per_option():
    from launch.train import build_parser

    flags = {action.dest for action in build_parser()._actions}
    assert set(CONFIG_KEYS) <= flags, set(CONFIG_KEYS) - flags


def test_flags_round_trip_into_options():
    import argparse

    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--vote", "average", "--master_weights", "false", "--momentum_dtype", "bfloat16",
                              "--ranks_per_node", "2", "--momentum_sync_every", "16", "--timeout", "5"])
    options = DistLionOptions(**from_flags(args))
    assert (options.vote, options.master_weights, options.momentum_dtype, options.ranks_per_node,
            options.momentum_sync_every, options.timeout) == ("average", False, torch.bfloat16, 2, 16, 5.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--k", "nope"])


def test_agreed_settings_cover_every_group_value_and_the_wire_settings():
    groups = [{"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.0, "vote_ema_beta": None}]
    settings = DistLionOptions().agreed_settings(groups)
    assert set(settings) == set(AGREED_KEYS) | {f"param group 0 {key}" for key in GROUP_KEYS}
    # what changes the bytes on the wire or the arithmetic must be agreed; groups and meshes cannot be compared
    assert {"vote", "exchange", "k", "momentum_sync_every", "momentum_dtype"} <= set(AGREED_KEYS)
    assert not {"process_group", "node_group", "device_mesh"} & set(AGREED_KEYS)


def test_state_holds_dtype_names_not_dtypes():
    opt = DistLion([torch.nn.Parameter(torch.zeros(3))], momentum_dtype=torch.bfloat16)
    groups = opt.state_dict()["param_groups"]
    assert groups[0]["momentum_dtype"] == "bfloat16" and groups[0]["reduce_dtype"] == "float32"
    assert not any(isinstance(value, torch.dtype) for group in groups for value in group.values())
    assert opt.layout.states[0].momentum.dtype == torch.bfloat16


@pytest.mark.parametrize("option, value, named", [
    ("momentum_dtype", "int8", "('float32', 'bfloat16', 'float16')"),
    ("momentum_dtype", torch.int8, "('float32', 'bfloat16', 'float16')"),
    ("reduce_dtype", 3, "('float32', 'bfloat16', 'float16')"),
    ("vote", 1, "('majority', 'average')"),
    ("k", None, "('sign', 'dead_zone', 'top')"),
    ("master_weights", "yes", "True or False"),
    ("bucket_cap_mb", "25", "positive size"),
    ("timeout", "5", "seconds > 0"),
    ("momentum_sync_every", 2.5, "whole number"),
    ("ranks_per_node", "2", "positive int"),
])
def test_a_bad_option_names_its_value_and_the_choices(option, value, named):
    with pytest.raises(ValueError) as error:
        DistLion([torch.nn.Parameter(torch.zeros(3))], **{option: value})
    assert f"Invalid {option}: {value!r}" in str(error.value) and named in str(error.value)


def test_an_unknown_keyword_is_refused_with_the_list():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['eps'\]"):
        DistLion([torch.nn.Parameter(torch.zeros(3))], eps=1e-8)
