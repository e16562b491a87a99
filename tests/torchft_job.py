"""One replica group (one rank) of a fault-tolerant DistLion run on torchft, for tests/test_torchft.py.

    python tests/torchft_job.py --replica 0 --lighthouse http://host:port --store_port 29700 \
        --steps 20 --out result.json [--kill_at 6] [--kill_in_exchange_at 6]

Trains a small MLP with ``distlion.torchft.FaultTolerantDistLion`` on data of its own
(seeded by the replica and the step) until the Manager's step reaches ``--steps``, and
writes, after every attempted step, what the tests assert on: the Manager's step, whether
it was committed, the voters, digests of the parameters and the momentum before and after
the step, and the byte counters. ``--end_with_voters N`` goes on past ``--steps`` until a step
had N voters (a replacement joined). ``--kill_at K`` SIGKILLs this process once a step K or later is
committed; ``--kill_in_exchange_at K`` SIGKILLs it at step K just before it sends its signs,
so the others are left mid-vote.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import time
from datetime import timedelta

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import TCPStore
from torchft import Manager, ProcessGroupGloo

from distlion.torchft import FaultTolerantDistLion

IN, HIDDEN, OUT = 16, 32, 4
BATCH = 8
MAX_EXTRA_STEPS, WAIT_S = 600, 0.05


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + replica)
    x = torch.randn(BATCH, IN, generator=g)
    return x, (x[:, :OUT] * 2 + 0.1 * torch.randn(BATCH, OUT, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replica", type=int, required=True)
    parser.add_argument("--lighthouse", required=True)
    parser.add_argument("--store_port", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill_at", type=int, default=None)
    parser.add_argument("--kill_in_exchange_at", type=int, default=None)
    parser.add_argument("--momentum_sync_every", type=int, default=None)
    parser.add_argument("--end_with_voters", type=int, default=1,
                        help="go on past --steps until a step had this many voters (a replacement joined)")
    args = parser.parse_args()

    store = TCPStore("localhost", args.store_port, is_master=True, wait_for_workers=False)  # this group's store
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=1,
                      load_state_dict=None, state_dict=None, use_async_quorum=False,
                      replica_id=f"replica_{args.replica}", store_addr="localhost", store_port=args.store_port,
                      rank=0, world_size=1, lighthouse_addr=args.lighthouse, hostname="localhost",
                      timeout=timedelta(seconds=10), quorum_timeout=timedelta(seconds=10),
                      connect_timeout=timedelta(seconds=10))
    torch.manual_seed(args.replica)  # other initial weights on every replica: the Manager syncs them
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    optimizer = FaultTolerantDistLion(manager, model, lr=1e-2, weight_decay=0.1, timeout=10,
                                      momentum_sync_every=args.momentum_sync_every)
    if args.kill_in_exchange_at is not None:
        launch = optimizer.quorum.all_gather

        def all_gather_or_die(outputs, tensor):
            if manager.current_step() == args.kill_in_exchange_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return launch(outputs, tensor)
        optimizer.quorum.all_gather = all_gather_or_die

    records = []
    params = list(model.parameters())
    voters = 0
    while manager.current_step() < args.steps or voters < args.end_with_voters:
        if manager.current_step() > args.steps + MAX_EXTRA_STEPS:
            raise SystemExit(f"no step had {args.end_with_voters} voters within {MAX_EXTRA_STEPS} extra steps")
        if voters < args.end_with_voters and manager.current_step() >= args.steps:
            time.sleep(WAIT_S)  # waiting for a replacement: slowly
        optimizer.zero_grad()
        step = manager.current_step()
        x, y = batch(args.replica, step)
        F.mse_loss(model(x), y).backward()
        before = digest(params), digest(optimizer.optimizer.layout.momenta())
        optimizer.step()
        stats = optimizer.comm_stats
        voters = optimizer.quorum.voters()
        records.append({"step": step, "committed": optimizer.quorum.committed, "voters": voters,
                        "params_before": before[0], "params_after": digest(params),
                        "momentum_before": before[1], "momentum_after": digest(optimizer.optimizer.layout.momenta()),
                        "steps_taken": optimizer.optimizer.steps_taken,
                        "inter_node_bytes_sent": stats.inter_node_bytes_sent, "vote_steps": stats.steps})
        with open(args.out, "w") as f:  # rewritten every step: what a killed replica did is kept
            json.dump({"records": records, "num_parameters": sum(p.numel() for p in params)}, f)
        if args.kill_at is not None and manager.current_step() >= args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    manager.shutdown(wait=False)
    del store
    os._exit(0)  # torchft's servers keep threads; the result is written


if __name__ == "__main__":
    main()
