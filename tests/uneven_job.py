"""A job whose rank 0 takes one step more than the others, under a real launcher (torchrun).

Rank 0 waits in its extra step until DistLion's timeout, raises ``CollectiveError`` and must
then exit, so that the launcher returns; the other ranks stay alive meanwhile, as ranks that
went on to other work would::

    torchrun --standalone --nproc_per_node 4 tests/uneven_job.py --layout nodes
"""

import argparse
import time

import torch
import torch.distributed as dist

from distlion import DistLion

STAY_ALIVE_S = 120  # longer than any test's bound: only rank 0's own exit can end the job in time


def build(layout: str) -> tuple[list[torch.nn.Parameter], DistLion]:
    torch.manual_seed(0)
    if layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("replicate", "shard"))
        model = torch.nn.Linear(32, 32)
        fully_shard(model, mesh=mesh["shard"])
        return list(model.parameters()), DistLion(model.parameters(), lr=0.01, timeout=5, device_mesh=mesh)
    model = torch.nn.Linear(32, 32)
    ranks_per_node = 2 if layout == "nodes" else 1
    return list(model.parameters()), DistLion(model.parameters(), lr=0.01, timeout=5, ranks_per_node=ranks_per_node)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=("flat", "nodes", "fsdp"), required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    params, opt = build(args.layout)
    torch.manual_seed(dist.get_rank())
    for _ in range(3 + (dist.get_rank() == 0)):
        for p in params:
            p.grad = torch.randn_like(p)  # each rank its own gradients
        opt.step()
    time.sleep(STAY_ALIVE_S)


if __name__ == "__main__":
    main()
