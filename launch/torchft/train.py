"""One replica group of a fault-tolerant DistLion run on torchft: a byte-level GPT on the stdlib corpus.

Launched by ``launch/torchft/local.sh`` (one machine) or ``launch/torchft/slurm.sbatch``:
each replica group is one torchrun launch of one rank, a voter, and finds the others
through torchft's Lighthouse::

    TORCHFT_LIGHTHOUSE=http://host:29510 REPLICA_GROUP_ID=0 NUM_REPLICA_GROUPS=3 \\
        torchrun --nproc_per_node 1 --master_port 29600 -m launch.torchft.train --steps 200

Every ``--log_every`` steps rank 0 of the group prints the step, the loss, the voters in
the quorum and the bytes it sent per step. A group killed at any moment leaves the others
training; started again, it rejoins with a live peer's state (``distlion.torchft``).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

from distlion.torchft import FaultTolerantDistLion
from launch.data import load_corpus, train_batch
from launch.model import GPT, GPTConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="the Manager's step to stop at")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--weight_decay", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds any collective or quorum may wait")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    group_id, groups = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ["NUM_REPLICA_GROUPS"])
    rank, group_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if group_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")  # refused below, with the fix: a group is one rank
    timeout = timedelta(seconds=args.timeout)
    across = ProcessGroupNCCL(timeout=timeout) if cuda else ProcessGroupGloo(timeout=timeout)
    manager = Manager(pg=across, min_replica_size=1, load_state_dict=None,
                      state_dict=None, use_async_quorum=False, replica_id=f"distlion_{group_id}",
                      timeout=timeout, quorum_timeout=timeout)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=args.block_size)).to(device)
    optimizer = FaultTolerantDistLion(manager, model, lr=args.lr, weight_decay=args.weight_decay,
                                      timeout=args.timeout)
    corpus = load_corpus()
    while manager.current_step() < args.steps:
        optimizer.zero_grad()
        step = manager.current_step()
        x, y = train_batch(corpus, step=step, rank=group_id * group_size + rank, world_size=groups * group_size,
                           batch_size=args.batch_size, block_size=args.block_size, seed=0)
        loss = model(x.to(device), y.to(device))[1]
        loss.backward()
        optimizer.step()
        stats = optimizer.comm_stats
        if rank == 0 and step % args.log_every == 0 and optimizer.quorum.committed:
            print(f"group {group_id} step {step}: loss {loss.item():.3f}, {optimizer.quorum.voters()} voters, "
                  f"{stats.bytes_sent_per_step:,.0f} bytes sent per step, {stats.uncommitted_steps} steps not "
                  f"committed", flush=True)
    manager.shutdown(wait=False)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
