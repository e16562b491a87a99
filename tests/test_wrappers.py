"""distlion.unwrap: DistLion found inside optimizer wrappers, and only there."""

import types

import torch

import distlion
from distlion import DistLion


def _distlion() -> DistLion:
    return DistLion(torch.nn.Linear(4, 2).parameters(), lr=1e-3)


class _Wrapper:
    """The shape of DeepSpeed's FP16_UnfusedOptimizer: not a torch Optimizer, keeps ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def test_unwrap_finds_distlion_in_wrappers():
    inner = _distlion()
    assert distlion.unwrap(inner) is inner
    assert distlion.unwrap(_Wrapper(_Wrapper(inner))) is inner
    # A DeepSpeed engine keeps the client optimizer as basic_optimizer, its wrapper as optimizer.
    engine = types.SimpleNamespace(basic_optimizer=inner, optimizer=_Wrapper(inner))
    assert distlion.unwrap(engine) is inner


def test_unwrap_returns_none_without_distlion():
    model = torch.nn.Linear(4, 2)
    adamw = torch.optim.AdamW(model.parameters())
    assert distlion.unwrap(adamw) is None and distlion.unwrap(_Wrapper(adamw)) is None
    assert distlion.unwrap(model) is None and distlion.unwrap(None) is None
    assert distlion.unwrap(types.SimpleNamespace(basic_optimizer=None, optimizer=None)) is None
    looped = types.SimpleNamespace(param_groups=[])
    looped.optimizer = looped
    assert distlion.unwrap(looped) is None  # a wrapper that wraps itself ends the search


def test_unwrap_does_not_take_a_scheduler_for_a_wrapper():
    # A scheduler's .optimizer is the optimizer it drives; distlion.accelerate.prepare must not
    # mistake a scheduler for a second DistLion.
    scheduler = torch.optim.lr_scheduler.LambdaLR(_distlion(), lambda step: 1.0)
    assert distlion.unwrap(scheduler) is None

