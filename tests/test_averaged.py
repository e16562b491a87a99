"""DistLion notices gradients that were averaged before it saw them (DDP kept, Trainer, same batch).

Real gloo processes: DDP left around the model, rank-dependent data without DDP, and zero
gradients. Only the first warns, on every rank, and marks ``comm_stats``.
"""

import logging

import pytest
import torch

from distlion import DistLion
from distlion.averaged import WATCHED_STEPS
from multiprocess import run_ranks

pytestmark = pytest.mark.multiprocess


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train(rank, world_size, case, ranks_per_node=1):
    records = _Records()
    logging.getLogger("distlion.averaged").addHandler(records)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = DistLion(model.parameters(), lr=1e-3, ranks_per_node=ranks_per_node)
    forward = torch.nn.parallel.DistributedDataParallel(model) if case == "ddp" else model
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for _ in range(WATCHED_STEPS + 2):
        x = torch.randn(8, 16, generator=generator)
        loss = forward(x).pow(2).mean() * (0.0 if case == "zero" else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return records.messages, opt.comm_stats.gradients_already_averaged, opt.comm_stats.compression


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size, ranks_per_node", [(2, 1), (4, 2)])
def test_gradients_averaged_by_ddp_warn_on_every_rank(world_size, ranks_per_node):
    for messages, flagged, compression in run_ranks(_train, world_size, "ddp", ranks_per_node, timeout=90):
        assert len(messages) == 1 and "averaged across ranks before DistLion saw them" in messages[0]
        assert "DistributedDataParallel" in messages[0] and "distlion.accelerate.prepare" in messages[0]
        assert flagged and compression == 0.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["local", "zero"])
def test_local_or_zero_gradients_do_not_warn(case):
    for messages, flagged, compression in run_ranks(_train, 2, case, timeout=90):
        assert messages == [] and not flagged
        assert compression > 1  # the saving is real
