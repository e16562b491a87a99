"""A real constrained link: workers in network namespaces, joined by rate-limited veth links.

Each network namespace is a node of G ranks (``--ranks_per_node``, 1 by default: a
namespace per worker). Two nodes are joined by one veth pair; more by veth pairs to a
bridge (in a namespace of its own too), like hosts on a switch. Every link is limited in
both directions with ``tc qdisc ... tbf rate R`` (1gbit and 10gbit by default). The
ranks of one node reach each other over its loopback: gloo binds every rank to its
node's veth address (GLOO_SOCKET_IFNAME), and the kernel routes traffic to a local
address over ``lo``, so only traffic between nodes crosses the shaped link. The workers
run the same training steps with DistLion (Lion's step, and the scaled step
``vote_ema_beta=0.9``) and with AdamW + DDP (see ``benchmarks.step_time`` and
``benchmarks.harness``); with G > 1 also with DistLion voting per node
(``ranks_per_node=G``: ``distlion_node``, ``distlion_node_scaled``) beside the flat vote
of every rank. They report

- bytes on the wire: each node's veth counters (tx and rx bytes, headers and
  acknowledgements included) around the timed steps, and its loopback's tx bytes;
- time per step, and per optimizer-plus-communication phase;
- the ratios AdamW + DDP / DistLion, and with G > 1 AdamW + DDP / node vote and flat
  vote / node vote, against their targets: at least 40x fewer inter-node wire bytes
  than AdamW + DDP, and fewer than the flat vote (docs/design.md §6).

``--fsdp`` (with G > 1) runs the FSDP2 pair instead, on a (replicate, shard) mesh of the
M namespaces x G ranks (rank = node * G + g; see ``benchmarks.harness``), each
transformer block and the root sharded: ``fsdp_hybrid_adamw``, FSDP2's hybrid sharding
over the 2-D mesh (reduce-scatter in the node, fp32 all-reduce of the shards across
nodes, in backward) + AdamW, and ``fsdp_distlion``, ``fully_shard`` over the shard dim +
``DistLion(..., device_mesh=mesh)`` voting across nodes. Same counters; the ratios are
FSDP2 hybrid + AdamW / FSDP2 + DistLion, against the target of at least 30x fewer
inter-node wire bytes. The phase is ``optimizer.step()`` for both, so only DistLion's
holds its inter-node communication (HSDP's all-reduce runs in backward): compare whole
steps. Results go to ``netlink-fsdp-MxG-DATE.json``.

Needs root and iproute2 (``ip netns``, ``tc``); without them it says so and exits with
status 0. It touches only the namespaces it creates (named ``dl-bench-PID-...``; no
interface is created in the caller's namespace) and deletes them when it ends, also on
errors and Ctrl-C::

    sudo python -m benchmarks.netlink                        # 24.2M params, N = 2 and 4 (~5 min)
    sudo python -m benchmarks.netlink --world_sizes 2 --rates 1gbit
    sudo python -m benchmarks.netlink --world_sizes 4 --ranks_per_node 2 --rates 1gbit   # 2 nodes x 2
    sudo python -m benchmarks.netlink --smoke                # tiny model, N = 2, one rate
    sudo python -m benchmarks.netlink --smoke --ranks_per_node 2   # tiny model, 2 nodes x 2
    sudo python -m benchmarks.netlink --world_sizes 4 --ranks_per_node 2 --rates 1gbit --fsdp   # FSDP2 pair
    sudo python -m benchmarks.netlink --smoke --ranks_per_node 2 --fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch.distributed as dist

from benchmarks import harness, step_time

SUBNET = "10.123.0"
MASTER_PORT = 29500  # free: nothing else listens inside the new namespaces
SKIP_PREFIX = "netlink: skipped"


class Topology:
    """Namespaces of ``ranks_per_node`` ranks, veth pairs, an optional bridge and tbf qdiscs;
    ``close()`` removes them all.

    Rank r runs in namespace ``r // ranks_per_node`` (torchrun's rank order on nodes) and
    binds to that namespace's veth address.
    """

    def __init__(self, nodes: int, rate: str, tag: str, ranks_per_node: int = 1):
        self.nodes, self.ranks_per_node, self.rate, self.tag = nodes, ranks_per_node, rate, tag
        self.node_namespaces = [f"dl-bench-{tag}-n{i}" for i in range(nodes)]
        self.bridge_ns = f"dl-bench-{tag}-br" if nodes > 2 else None
        self.namespaces: list[str] = []
        self.iface = "dlb0"  # the node's end of its link, in each node's namespace

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def describe(self) -> str:
        link = "veth pair" if self.bridge_ns is None else "veth pairs to a bridge"
        if self.ranks_per_node == 1:
            return link
        return f"{link}; {self.ranks_per_node} ranks per namespace, joined by its loopback"

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _limit(self, namespace: str, device: str) -> None:
        # burst: 1 ms at the rate, at least one 64 KiB GSO packet; latency bounds the queue.
        rate_bits = _rate_bits(self.rate)
        burst = max(rate_bits // 8 // 1000, 65536)
        subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
                        "rate", self.rate, "burst", str(burst), "latency", "50ms"], check=True, capture_output=True,
                       text=True)

    def _add_namespace(self, name: str) -> None:
        self._ip("netns", "add", name)
        self.namespaces.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def open(self) -> "Topology":
        for ns in self.node_namespaces:
            self._add_namespace(ns)
        if self.bridge_ns is None:  # two nodes: one veth pair
            a, b = self.node_namespaces
            self._ip("link", "add", self.iface, "netns", a, "type", "veth", "peer", "name", self.iface, "netns", b)
            pairs = [(a, self.iface), (b, self.iface)]
        else:  # a switch: every node's veth ends on a bridge port
            self._add_namespace(self.bridge_ns)
            self._ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            pairs = []
            for i, ns in enumerate(self.node_namespaces):
                port = f"port{i}"
                self._ip("link", "add", self.iface, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                         self.bridge_ns)
                self._ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
                self._ip("-n", self.bridge_ns, "link", "set", port, "up")
                pairs.append((self.bridge_ns, port))  # the port's egress is the node's download
                pairs.append((ns, self.iface))
        for i, ns in enumerate(self.node_namespaces):
            self._ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", self.iface)
            self._ip("-n", ns, "link", "set", self.iface, "up")
        for ns, device in pairs:
            self._limit(ns, device)
        return self

    def namespace(self, rank: int) -> str:
        return self.node_namespaces[rank // self.ranks_per_node]

    def address(self, rank: int) -> str:
        """The veth address of ``rank``'s node, shared by the node's ranks."""
        return f"{SUBNET}.{rank // self.ranks_per_node + 1}"

    def close(self) -> None:
        for ns in reversed(self.namespaces):  # deleting a namespace deletes its interfaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def _rate_bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return int(float(rate[:-len(unit)]) * scale)
    raise ValueError(f"rate {rate!r}: use a number followed by kbit, mbit or gbit, e.g. 1gbit")


def _rate_arg(text: str) -> str:
    try:
        _rate_bits(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def cannot_run() -> str | None:
    """Return why namespaces cannot be made here (None when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces (run it with sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}` command"
    probe = f"dl-bench-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# --------------------------------------------------------------------------------- worker

NODE_TRAINERS = ("distlion_node", "distlion_node_scaled")
FSDP_TRAINERS = ("fsdp_hybrid_adamw", "fsdp_distlion")
# Read around every timed block; the totals become "<name>_per_step" in the results.
COUNTERS = ("wire_tx_bytes", "wire_rx_bytes", "loopback_tx_bytes", "inter_node_bytes_sent")


def node_trainers(config, ranks_per_node: int) -> list[harness.Trainer]:
    """DistLion voting per node of ``ranks_per_node`` ranks, with Lion's step and with the scaled step."""
    return [harness.distlion_trainer(config, ranks_per_node=ranks_per_node, name="distlion_node"),
            harness.distlion_trainer(config, ranks_per_node=ranks_per_node, vote_ema_beta=0.9,
                                     name="distlion_node_scaled")]


def fsdp_trainers(config, ranks_per_node: int) -> list[harness.Trainer]:
    """FSDP2 hybrid sharding + AdamW, and FSDP2 in the node + DistLion voting across nodes, on one mesh."""
    mesh = harness.device_mesh(ranks_per_node)
    return [harness.fsdp_adamw_trainer(config, mesh), harness.fsdp_distlion_trainer(config, mesh)]


def _counters(iface: str) -> tuple[int, int]:
    base = f"/sys/class/net/{iface}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def worker(args: argparse.Namespace) -> None:
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    batch = harness.make_batch(config, args.batch_size, args.seq_len, rank)
    if args.fsdp:
        trainers = fsdp_trainers(config, args.ranks_per_node)
    else:
        trainers = step_time.build_trainers(config)
        if args.ranks_per_node > 1:
            trainers += node_trainers(config, args.ranks_per_node)
    stats = {t.name: t.comm_stats for t in trainers}
    marks: dict[str, dict[str, int]] = {}

    def read(name: str) -> dict[str, int]:
        tx, rx = _counters(args.iface)
        counts = {"wire_tx_bytes": tx, "wire_rx_bytes": rx, "loopback_tx_bytes": _counters("lo")[0]}
        if stats[name] is not None:  # DistLion: what it counted for the vote between nodes
            counts["inter_node_bytes_sent"] = stats[name].inter_node_bytes_sent
        return counts

    def before(name: str) -> None:
        dist.barrier()  # everyone's previous traffic is done
        marks[name] = read(name)

    def after(name: str) -> dict:
        dist.barrier()
        return {key: value - marks[name][key] for key, value in read(name).items()}

    timings = harness.interleaved(trainers, batch, warmup=args.warmup, steps=args.steps, rounds=args.rounds,
                                  before=before, after=after)
    measured_steps = args.steps * args.rounds
    for name, t in timings.items():
        for key in COUNTERS:
            if key in t:
                t[f"{key}_per_step"] = t.pop(key) / measured_steps
        if stats[name] is not None:
            t["ranks_per_node"] = stats[name].ranks_per_node
    everyone = [None] * world_size
    dist.all_gather_object(everyone, timings)
    harness.finish_worker(args.result, {"world_size": world_size, "per_rank": everyone})


# --------------------------------------------------------------------------- orchestrator

def run_on_link(args: argparse.Namespace, topology: Topology, worker_args: list[str]) -> dict:
    """Build the topology, run its workers in it, tear it down; return the workers' measurements."""
    procs: list[subprocess.Popen] = []
    world_size = topology.world_size
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        try:
            topology.open()
            for rank in range(world_size):
                env = {**harness.worker_env(rank, world_size, topology.address(0), MASTER_PORT),
                       "GLOO_SOCKET_IFNAME": topology.iface}
                command = ["ip", "netns", "exec", topology.namespace(rank), sys.executable, "-m", __spec__.name,
                           "--worker", "--result", result, "--iface", topology.iface, *worker_args]
                procs.append(subprocess.Popen(command, env=env, cwd=harness.REPO))
            deadline = time.monotonic() + args.timeout
            for proc in procs:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
                if code != 0:
                    raise RuntimeError(f"a worker exited with status {code} ({topology.nodes} nodes x "
                                       f"{topology.ranks_per_node}, {topology.rate})")
            with open(result) as f:
                return json.load(f)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            topology.close()


# Interface counters: the ranks of a node read the same interfaces, so these are per node.
NODE_COUNTERS = ("wire_tx_bytes_per_step", "wire_rx_bytes_per_step", "loopback_tx_bytes_per_step")
WIRE_TARGET_ADAMW_OVER_NODE = 40  # inter-node wire bytes, AdamW + DDP / node vote (48x ideal at 2 x 2)
WIRE_TARGET_FSDP = 30  # inter-node wire bytes, FSDP2 hybrid + AdamW (fp32 all-reduce) / FSDP2 + DistLion (32x ideal)


def _average(measured: dict, ranks_per_node: int) -> dict:
    """Times and counted bytes: mean over ranks; interface counters: mean over nodes (and their sum)."""
    ranks = measured["per_rank"]
    nodes = ranks[::ranks_per_node]  # a node's first rank reads its interfaces
    out = {}
    for name in ranks[0]:
        out[name] = {key: statistics.mean(r[name][key] for r in (nodes if key in NODE_COUNTERS else ranks))
                     for key in ranks[0][name]}
        out[name]["wire_tx_bytes_per_step_all_nodes"] = sum(r[name]["wire_tx_bytes_per_step"] for r in nodes)
    return out


def summarize_fsdp(measured: dict, ranks_per_node: int) -> dict:
    """The FSDP2 pair's averages, the ratios FSDP2 hybrid + AdamW / FSDP2 + DistLion and the target."""
    out = _average(measured, ranks_per_node)
    hybrid, lion = out["fsdp_hybrid_adamw"], out["fsdp_distlion"]
    wire = "wire_tx_bytes_per_step"
    ratios = {
        "wire_bytes_hybrid_adamw_over_distlion": hybrid[wire] / lion[wire],
        # counted: HSDP's all-reduce (ring formula) against DistLion's vote, per rank
        "counted_inter_node_bytes_hybrid_adamw_over_distlion":
            hybrid["bytes_sent_per_step"] / lion["inter_node_bytes_sent_per_step"],
        "step_hybrid_adamw_over_distlion": hybrid["step_s"] / lion["step_s"],
        "phase_hybrid_adamw_over_distlion": hybrid["phase_s"] / lion["phase_s"],
        # a node's veth tx over what its ranks counted crossing it: 1 plus headers and acknowledgements
        "wire_over_counted_hybrid_adamw": hybrid[wire] / (ranks_per_node * hybrid["bytes_sent_per_step"]),
        "wire_over_counted_distlion": lion[wire] / (ranks_per_node * lion["inter_node_bytes_sent_per_step"]),
    }
    out["ratios"] = ratios
    out["targets"] = {f"wire_bytes_hybrid_adamw_over_distlion >= {WIRE_TARGET_FSDP}":
                      ratios["wire_bytes_hybrid_adamw_over_distlion"] >= WIRE_TARGET_FSDP}
    return out


def summarize_link(measured: dict, ranks_per_node: int = 1) -> dict:
    """Average the measurements (times and counted bytes per rank, interface counters per node) and
    form the ratios; with ``ranks_per_node`` > 1 also those against the node vote, and its targets."""
    out = _average(measured, ranks_per_node)
    lion, ddp, ddp_phase = out["distlion"], out["adamw_ddp"], out["adamw_ddp_phase"]
    ratios = {
        "phase_adamw_over_distlion": ddp_phase["phase_s"] / lion["phase_s"],
        "phase_adamw_over_distlion_scaled": ddp_phase["phase_s"] / out["distlion_scaled"]["phase_s"],
        "step_adamw_over_distlion": ddp["step_s"] / lion["step_s"],
        "wire_bytes_adamw_over_distlion": ddp["wire_tx_bytes_per_step"] / lion["wire_tx_bytes_per_step"],
        "counted_bytes_adamw_over_distlion": ddp["bytes_sent_per_step"] / lion["bytes_sent_per_step"],
    }
    out["ratios"] = ratios
    if ranks_per_node == 1:
        return out
    node = out["distlion_node"]
    wire = "wire_tx_bytes_per_step"
    ratios.update({
        "wire_bytes_adamw_over_node": ddp[wire] / node[wire],
        "wire_bytes_flat_over_node": lion[wire] / node[wire],
        "phase_adamw_over_node": ddp_phase["phase_s"] / node["phase_s"],
        "phase_adamw_over_node_scaled": ddp_phase["phase_s"] / out["distlion_node_scaled"]["phase_s"],
        "phase_flat_over_node": lion["phase_s"] / node["phase_s"],
        "step_adamw_over_node": ddp["step_s"] / node["step_s"],
        "step_flat_over_node": lion["step_s"] / node["step_s"],
        # The node's veth tx over the vote bytes its ranks counted: 1 plus headers and acknowledgements
        # when the intra-node reduce-scatter and all-gather stay on loopback.
        "wire_over_counted_node_vote": node[wire] / (ranks_per_node * node["inter_node_bytes_sent_per_step"]),
    })
    out["targets"] = {
        f"wire_bytes_adamw_over_node >= {WIRE_TARGET_ADAMW_OVER_NODE}":
            ratios["wire_bytes_adamw_over_node"] >= WIRE_TARGET_ADAMW_OVER_NODE,
        "wire_bytes_flat_over_node > 1": ratios["wire_bytes_flat_over_node"] > 1,
    }
    return out


def print_link(topology: Topology, summary: dict) -> None:
    ranks_per_node = topology.ranks_per_node
    names = step_time.TRAINERS if ranks_per_node == 1 else step_time.TRAINERS + NODE_TRAINERS
    if ranks_per_node == 1:
        print(f"\nN = {topology.world_size} workers, {topology.rate} links (per rank, mean over ranks of "
              f"per-rank medians)")
        print(f"{'trainer':18s} {'phase ms':>9} {'step ms':>9} {'wire tx/step':>14} {'counted/step':>14}")
    else:
        print(f"\n{topology.nodes} nodes x {ranks_per_node} ranks, {topology.rate} links (times: mean over ranks "
              f"of per-rank medians; wire and loopback bytes: per node; counted: per rank)")
        print(f"{'trainer':20s} {'phase ms':>9} {'step ms':>9} {'wire tx/step':>14} {'loopback/step':>14} "
              f"{'counted/step':>14}")
    for name in names:
        t = summary[name]
        if ranks_per_node == 1:
            print(f"{name:18s} {t['phase_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} {t['wire_tx_bytes_per_step']:14,.0f} "
                  f"{t['bytes_sent_per_step']:14,.0f}")
        else:
            print(f"{name:20s} {t['phase_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} "
                  f"{t['wire_tx_bytes_per_step']:14,.0f} {t['loopback_tx_bytes_per_step']:14,.0f} "
                  f"{t['bytes_sent_per_step']:14,.0f}")
    r = summary["ratios"]
    print(f"AdamW + DDP / DistLion: phase {r['phase_adamw_over_distlion']:.1f}x, whole step "
          f"{r['step_adamw_over_distlion']:.2f}x, wire bytes {r['wire_bytes_adamw_over_distlion']:.1f}x; "
          f"phase with the scaled step {r['phase_adamw_over_distlion_scaled']:.1f}x")
    if ranks_per_node == 1:
        return
    print(f"AdamW + DDP / node vote: wire bytes {r['wire_bytes_adamw_over_node']:.1f}x "
          f"(target >= {WIRE_TARGET_ADAMW_OVER_NODE}x), phase {r['phase_adamw_over_node']:.1f}x, whole step "
          f"{r['step_adamw_over_node']:.2f}x; phase with the scaled step {r['phase_adamw_over_node_scaled']:.1f}x")
    print(f"flat vote / node vote: wire bytes {r['wire_bytes_flat_over_node']:.2f}x (target > 1), phase "
          f"{r['phase_flat_over_node']:.2f}x, whole step {r['step_flat_over_node']:.2f}x")
    print(f"node vote: veth tx / counted vote bytes {r['wire_over_counted_node_vote']:.3f}; targets "
          + ", ".join(f"{target}: {'met' if met else 'missed'}" for target, met in summary["targets"].items()))


def print_fsdp(topology: Topology, summary: dict) -> None:
    print(f"\n{topology.nodes} nodes x {topology.ranks_per_node} ranks, FSDP2, {topology.rate} links (times: mean "
          f"over ranks of per-rank medians; wire and loopback bytes: per node; counted inter-node: per rank)")
    print(f"{'trainer':20s} {'phase ms':>9} {'step ms':>9} {'wire tx/step':>14} {'loopback/step':>14} "
          f"{'counted/step':>14}")
    for name in FSDP_TRAINERS:
        t = summary[name]
        counted = t.get("inter_node_bytes_sent_per_step", t["bytes_sent_per_step"])
        print(f"{name:20s} {t['phase_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} {t['wire_tx_bytes_per_step']:14,.0f} "
              f"{t['loopback_tx_bytes_per_step']:14,.0f} {counted:14,.0f}")
    r = summary["ratios"]
    print(f"FSDP2 hybrid + AdamW / FSDP2 + DistLion: inter-node wire bytes "
          f"{r['wire_bytes_hybrid_adamw_over_distlion']:.1f}x (target >= {WIRE_TARGET_FSDP}x), counted "
          f"{r['counted_inter_node_bytes_hybrid_adamw_over_distlion']:.1f}x, whole step "
          f"{r['step_hybrid_adamw_over_distlion']:.2f}x (phase {r['phase_hybrid_adamw_over_distlion']:.2f}x: "
          f"HSDP's all-reduce is in backward)")
    print(f"veth tx / counted: hybrid + AdamW {r['wire_over_counted_hybrid_adamw']:.3f}, DistLion "
          f"{r['wire_over_counted_distlion']:.3f}; targets "
          + ", ".join(f"{target}: {'met' if met else 'missed'}" for target, met in summary["targets"].items()))


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world_sizes", type=harness.positive_int, nargs="+", default=[2, 4],
                        help="ranks in all, one run each")
    parser.add_argument("--ranks_per_node", type=harness.positive_int, default=1,
                        help="ranks per namespace (node); with G > 1 DistLion also votes per node")
    parser.add_argument("--fsdp", action="store_true",
                        help="the FSDP2 pair instead (G > 1): hybrid sharding + AdamW, and DistLion over the shards")
    parser.add_argument("--rates", type=_rate_arg, nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--size", choices=sorted(harness.MODEL_SIZES), default="medium")
    parser.add_argument("--batch_size", type=harness.positive_int, default=1, help="sequences per rank")
    parser.add_argument("--seq_len", type=harness.positive_int, default=32)
    parser.add_argument("--warmup", type=harness.positive_int, default=2)
    parser.add_argument("--steps", type=harness.positive_int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=harness.positive_int, default=2)
    parser.add_argument("--timeout", type=float, default=480, help="seconds per (N, rate) run")
    parser.add_argument("--iface", default=None, help=argparse.SUPPRESS)
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    ranks_per_node = args.ranks_per_node
    if args.smoke:
        args.size, args.world_sizes, args.rates, args.warmup, args.steps, args.rounds = \
            "tiny", [2 * ranks_per_node], ["1gbit"], 1, 2, 1
    if args.fsdp and ranks_per_node < 2:
        parser.error("--fsdp shards inside a node: use --ranks_per_node 2 or more")
    for world_size in args.world_sizes:
        if world_size % ranks_per_node or world_size // ranks_per_node < 2:
            parser.error(f"--world_sizes {world_size} with --ranks_per_node {ranks_per_node}: a link joins at "
                         f"least 2 nodes of {ranks_per_node} rank(s); use multiples of {ranks_per_node} from "
                         f"{2 * ranks_per_node}")
    reason = cannot_run()
    if reason is not None:
        print(f"{SKIP_PREFIX}: {reason}.")
        return None
    # SIGTERM (a CI timeout) becomes an exception, so the namespaces are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("netlink: terminated; namespaces removed"))
    worker_args = ["--size", args.size, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--rounds", str(args.rounds),
                   "--ranks_per_node", str(ranks_per_node), *(["--fsdp"] if args.fsdp else [])]
    config = harness.MODEL_SIZES[args.size]
    print(f"GPT of {config.num_parameters:,} parameters, batch {args.batch_size}x{args.seq_len} per rank")
    runs = []
    for world_size in args.world_sizes:
        for rate in args.rates:
            topology = Topology(world_size // ranks_per_node, rate, str(os.getpid()), ranks_per_node)
            measured = run_on_link(args, topology, worker_args)
            if args.fsdp:
                summary = summarize_fsdp(measured, ranks_per_node)
                print_fsdp(topology, summary)
            else:
                summary = summarize_link(measured, ranks_per_node)
                print_link(topology, summary)
            runs.append({"world_size": world_size, "nodes": topology.nodes, "ranks_per_node": ranks_per_node,
                         "rate": rate, "topology": topology.describe(), **summary})
    payload = {"model": args.size, "num_parameters": config.num_parameters, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "steps_per_round": args.steps, "rounds": args.rounds,
               "ranks_per_node": ranks_per_node, "fsdp": args.fsdp, "runs": runs}
    name = "netlink" if ranks_per_node == 1 else "-".join(
        ["netlink", *(["fsdp"] if args.fsdp else []),
         *(f"{n // ranks_per_node}x{ranks_per_node}" for n in args.world_sizes)])
    harness.write_results(name, payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
