"""A real constrained link: workers in network namespaces, joined by rate-limited veth links.

Two or four workers, each in a network namespace of its own. Two are joined by one
veth pair; four by veth pairs to a bridge (in a namespace of its own too), like hosts
on a switch. Every link is limited in both directions with ``tc qdisc ... tbf rate R``
(1gbit and 10gbit by default). The workers run the same training steps with DistLion
(Lion's step, and the scaled step ``vote_ema_beta=0.9``) and with AdamW + DDP (see
``benchmarks.step_time`` and ``benchmarks.harness``) and report

- bytes on the wire: each worker's interface counters (tx and rx bytes, headers and
  acknowledgements included) around the timed steps;
- time per step, and per optimizer-plus-communication phase;
- the ratios AdamW + DDP / DistLion.

Needs root and iproute2 (``ip netns``, ``tc``); without them it says so and exits with
status 0. It touches only the namespaces it creates (named ``dl-bench-PID-...``; no
interface is created in the caller's namespace) and deletes them when it ends, also on
errors and Ctrl-C::

    sudo python -m benchmarks.netlink                        # 24.2M params, N = 2 and 4 (~5 min)
    sudo python -m benchmarks.netlink --world_sizes 2 --rates 1gbit
    sudo python -m benchmarks.netlink --smoke                # tiny model, N = 2, one rate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    """Namespaces, veth pairs, an optional bridge and tbf qdiscs; ``close()`` removes them all."""

    def __init__(self, world_size: int, rate: str, tag: str):
        self.world_size, self.rate, self.tag = world_size, rate, tag
        self.workers = [f"dl-bench-{tag}-w{i}" for i in range(world_size)]
        self.bridge_ns = f"dl-bench-{tag}-br" if world_size > 2 else None
        self.namespaces: list[str] = []
        self.iface = "dlb0"  # the worker's end, in each worker's namespace

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
        for ns in self.workers:
            self._add_namespace(ns)
        if self.bridge_ns is None:  # two workers: one veth pair
            a, b = self.workers
            self._ip("link", "add", self.iface, "netns", a, "type", "veth", "peer", "name", self.iface, "netns", b)
            pairs = [(a, self.iface), (b, self.iface)]
        else:  # a switch: every worker's veth ends on a bridge port
            self._add_namespace(self.bridge_ns)
            self._ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            pairs = []
            for i, ns in enumerate(self.workers):
                port = f"port{i}"
                self._ip("link", "add", self.iface, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                         self.bridge_ns)
                self._ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
                self._ip("-n", self.bridge_ns, "link", "set", port, "up")
                pairs.append((self.bridge_ns, port))  # the port's egress is the worker's download
                pairs.append((ns, self.iface))
        for i, ns in enumerate(self.workers):
            self._ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.iface)
            self._ip("-n", ns, "link", "set", self.iface, "up")
        for ns, device in pairs:
            self._limit(ns, device)
        return self

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

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

def _counters(iface: str) -> tuple[int, int]:
    base = f"/sys/class/net/{iface}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def worker(args: argparse.Namespace) -> None:
    rank, world_size = harness.join_group()
    config = harness.MODEL_SIZES[args.size]
    batch = harness.make_batch(config, args.batch_size, args.seq_len, rank)
    marks: dict[str, tuple[int, int]] = {}

    def before(name: str) -> None:
        dist.barrier()  # everyone's previous traffic is done
        marks[name] = _counters(args.iface)

    def after(name: str) -> dict:
        dist.barrier()
        tx, rx = _counters(args.iface)
        return {"wire_tx_bytes": tx - marks[name][0], "wire_rx_bytes": rx - marks[name][1]}

    timings = harness.interleaved(step_time.build_trainers(config), batch, warmup=args.warmup, steps=args.steps,
                                  rounds=args.rounds, before=before, after=after)
    measured_steps = args.steps * args.rounds
    for t in timings.values():
        t["wire_tx_bytes_per_step"] = t.pop("wire_tx_bytes") / measured_steps
        t["wire_rx_bytes_per_step"] = t.pop("wire_rx_bytes") / measured_steps
    everyone = [None] * world_size
    dist.all_gather_object(everyone, timings)
    harness.finish_worker(args.result, {"world_size": world_size, "per_rank": everyone})


# --------------------------------------------------------------------------- orchestrator

def run_on_link(args: argparse.Namespace, world_size: int, rate: str, worker_args: list[str]) -> dict:
    """Build the topology, run the workers in it, tear it down; return the workers' measurements."""
    topology = Topology(world_size, rate, tag=str(os.getpid()))
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        try:
            topology.open()
            for rank, ns in enumerate(topology.workers):
                env = {**harness.worker_env(rank, world_size, topology.address(0), MASTER_PORT),
                       "GLOO_SOCKET_IFNAME": topology.iface}
                command = ["ip", "netns", "exec", ns, sys.executable, "-m", __spec__.name, "--worker",
                           "--result", result, "--iface", topology.iface, *worker_args]
                procs.append(subprocess.Popen(command, env=env, cwd=harness.REPO))
            deadline = time.monotonic() + args.timeout
            for proc in procs:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
                if code != 0:
                    raise RuntimeError(f"a worker exited with status {code} (N={world_size}, {rate})")
            with open(result) as f:
                return json.load(f)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            topology.close()


def summarize_link(measured: dict) -> dict:
    """Average the ranks' measurements (wire bytes per rank, times) and form the ratios."""
    ranks = measured["per_rank"]
    out = {}
    for name in ranks[0]:
        keys = ranks[0][name].keys()
        out[name] = {key: sum(r[name][key] for r in ranks) / len(ranks) for key in keys}
    lion, ddp, ddp_phase = out["distlion"], out["adamw_ddp"], out["adamw_ddp_phase"]
    out["ratios"] = {
        "phase_adamw_over_distlion": ddp_phase["phase_s"] / lion["phase_s"],
        "phase_adamw_over_distlion_scaled": ddp_phase["phase_s"] / out["distlion_scaled"]["phase_s"],
        "step_adamw_over_distlion": ddp["step_s"] / lion["step_s"],
        "wire_bytes_adamw_over_distlion": ddp["wire_tx_bytes_per_step"] / lion["wire_tx_bytes_per_step"],
        "counted_bytes_adamw_over_distlion": ddp["bytes_sent_per_step"] / lion["bytes_sent_per_step"],
    }
    return out


def print_link(world_size: int, rate: str, summary: dict) -> None:
    print(f"\nN = {world_size} workers, {rate} links (per rank, mean over ranks of per-rank medians)")
    print(f"{'trainer':18s} {'phase ms':>9} {'step ms':>9} {'wire tx/step':>14} {'counted/step':>14}")
    for name in step_time.TRAINERS:
        t = summary[name]
        print(f"{name:18s} {t['phase_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} {t['wire_tx_bytes_per_step']:14,.0f} "
              f"{t['bytes_sent_per_step']:14,.0f}")
    r = summary["ratios"]
    print(f"AdamW + DDP / DistLion: phase {r['phase_adamw_over_distlion']:.1f}x, whole step "
          f"{r['step_adamw_over_distlion']:.2f}x, wire bytes {r['wire_bytes_adamw_over_distlion']:.1f}x; "
          f"phase with the scaled step {r['phase_adamw_over_distlion_scaled']:.1f}x")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world_sizes", type=int, nargs="+", choices=(2, 4), default=[2, 4])
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
    if args.smoke:
        args.size, args.world_sizes, args.rates, args.warmup, args.steps, args.rounds = \
            "tiny", [2], ["1gbit"], 1, 2, 1
    reason = cannot_run()
    if reason is not None:
        print(f"{SKIP_PREFIX}: {reason}.")
        return None
    # SIGTERM (a CI timeout) becomes an exception, so the namespaces are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("netlink: terminated; namespaces removed"))
    worker_args = ["--size", args.size, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    config = harness.MODEL_SIZES[args.size]
    print(f"GPT of {config.num_parameters:,} parameters, batch {args.batch_size}x{args.seq_len} per rank")
    runs = []
    for world_size in args.world_sizes:
        for rate in args.rates:
            summary = summarize_link(run_on_link(args, world_size, rate, worker_args))
            print_link(world_size, rate, summary)
            runs.append({"world_size": world_size, "rate": rate,
                         "topology": "veth pair" if world_size == 2 else "veth pairs to a bridge",
                         **summary})
    payload = {"model": args.size, "num_parameters": config.num_parameters, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "steps_per_round": args.steps, "rounds": args.rounds, "runs": runs}
    harness.write_results("netlink", payload, args.out, args.smoke)
    return payload


if __name__ == "__main__":
    main()
