"""Accelerate's FSDP2 plugin with DistLion: 4 CPU processes as 2 nodes of 2, launched by tests/test_accelerate.py.

The script shards the model over each node's ranks itself and votes across the nodes
(docs/accelerate.md); the launch takes the FSDP2 settings of
``launch/accelerate/fsdp2_2x8gpu.yaml`` with 4 processes on one machine. The mesh is the
script's own (``--mesh own``: dims "replicate", "shard") or the one Accelerate builds from
``ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)`` (``--mesh accelerate``: dims
"dp_replicate", "dp_shard"); DistLion gets it as ``device_mesh`` or its replicate dim's group
as ``process_group`` (``--vote-over``). It trains 2k steps with ``save_state`` after step k,
then ``load_state(k)`` into the same objects and runs the last k steps again. Each rank
writes ``<out>/fsdp_rank<r>.pt``.

Accelerate (1.15 and 1.16) applies its FSDP plugin only to multi-GPU-like jobs; a CPU job
falls back to DDP without a word, and no public setting changes that. ``accelerator_on_cpu``
marks the shared state as multi-device before the Accelerator is built, so the plugin
applies on CPU with gloo: a test-only step that real GPU jobs do not take.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import distlion.accelerate
from distlion import DistLion
from distlion.worker_exit import exit_worker

BATCH = 4


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)])
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.blocks[1](torch.tanh(self.blocks[0](x)))))


def accelerator_on_cpu(**kwargs):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)  # gloo
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # see the module docstring
    return Accelerator(cpu=True, **kwargs)


def full(tensors) -> list[torch.Tensor]:
    return [t.full_tensor().detach().clone() for t in tensors]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3)
    parser.add_argument("--mesh", choices=("own", "accelerate"), default="own")
    parser.add_argument("--vote-over", choices=("device_mesh", "process_group"), default="device_mesh")
    args = parser.parse_args()
    if args.mesh == "accelerate":
        from accelerate.parallelism_config import ParallelismConfig

        accelerator = accelerator_on_cpu(parallelism_config=ParallelismConfig(dp_replicate_size=2, dp_shard_size=2))
        mesh, (replicate, shard) = accelerator.torch_device_mesh, ("dp_replicate", "dp_shard")
    else:
        accelerator = accelerator_on_cpu()
        mesh, (replicate, shard) = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")), \
            ("replicate", "shard")
    torch.manual_seed(0)
    model = Blocks()
    for module in [*model.blocks, model]:
        fully_shard(module, mesh=mesh[shard])
    vote_over = {"device_mesh": mesh} if args.vote_over == "device_mesh" else \
        {"process_group": mesh.get_group(replicate)}
    optimizer = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1, vote_ema_beta=0.9, **vote_over)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.05 * s))
    generator = torch.Generator().manual_seed(1234)
    n = args.steps * BATCH * accelerator.num_processes
    loader = DataLoader(TensorDataset(torch.randn(n, 8, generator=generator), torch.randn(n, 1, generator=generator)),
                        batch_size=BATCH, shuffle=False)
    model, optimizer, loader, scheduler = distlion.accelerate.prepare(accelerator, model, optimizer, loader,
                                                                      scheduler)
    inner = distlion.unwrap(optimizer)
    batches = list(loader)
    record = {"distributed_type": str(accelerator.distributed_type), "is_fsdp2": accelerator.is_fsdp2,
              "mesh_dim_names": mesh.mesh_dim_names, "params": [], "grads": []}

    def run(steps):
        for step in steps:
            x, y = batches[step]
            accelerator.backward(F.mse_loss(model(x), y))
            record["grads"].append([p.grad.to_local().clone() for p in model.parameters()])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            record["params"].append(full(model.parameters()))
            if step + 1 == args.save_at:
                accelerator.save_state(os.path.join(args.out, "ckpt"))

    run(range(args.steps))
    first = {"params": full(model.parameters()), "lr": scheduler.get_last_lr(),
             "momentum": [inner.state[p]["exp_avg"].clone() for p in model.parameters()]}
    accelerator.load_state(os.path.join(args.out, "ckpt"))
    run(range(args.save_at, args.steps))
    record.update(first=first, resumed={"params": full(model.parameters()), "lr": scheduler.get_last_lr(),
                                        "momentum": [inner.state[p]["exp_avg"].clone() for p in model.parameters()]},
                  comm=inner.comm_stats.as_dict(), saved=sorted(os.listdir(os.path.join(args.out, "ckpt"))))
    torch.save(record, os.path.join(args.out, f"fsdp_rank{accelerator.process_index}.pt"))
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_worker()
