"""Project communication time per step to clusters with an alpha-beta (latency-bandwidth) model.

**One GPU per node.** For N workers, a model of d parameters and links of B bit/s, one
collective of S bytes per rank costs ``steps * alpha + S / (efficiency * B)``:

=========================  ===================  ===============================
scheme                     latency steps        bytes sent per rank
=========================  ===================  ===============================
ring all-reduce fp32       2(N-1)               2(N-1)/N * 4d
ring all-reduce bf16       2(N-1)               2(N-1)/N * 2d
DistLion two-phase         2(N-1)               2(N-1)/N * d/8  (majority)
DistLion all-gather        N-1                  (N-1) * d/8
=========================  ===================  ===============================

(The buckets of a step pipeline, so the model counts one message of the whole model.)
Calibrated with what this repository measured, read from ``benchmarks/results``:

- bytes: each scheme's measured bytes per rank over its ideal (padding, flags), from
  the newest ``comm_volume-*.json`` at its largest N;
- efficiency: the fraction of the nominal link rate DDP's all-reduce achieved on the
  1 Gbit/s link, and the wire bytes over the payload (headers), from the newest
  ``netlink-*.json``.

alpha (per-message latency) is an assumption, ``--alpha_us`` (default 10 us, inter-node
RDMA plus software); veth links on one machine say nothing about a cluster's latency.
Only communication is projected: the optimizer's local arithmetic is not.

**Nodes of G GPUs** (docs/design.md §6). A cluster is M nodes of G GPUs (N = M*G); each
node has R NICs ("rails", default R = G, one per GPU) of B Gbit/s each, and its GPUs
share NVLink at V GB/s per GPU (per direction). Per node and step, the payload that
crosses the node's boundary, d parameters:

=====================  =====================================  ===================================
scheme                 bytes out of each node                 inside the node (per GPU, NVLink)
=====================  =====================================  ===================================
DDP fp32 (NCCL ring)   2(N-1)/N * 4d                          the ring's other hops: 2(N-1)/N * 4d
DDP bf16 (NCCL ring)   2(N-1)/N * 2d                          2(N-1)/N * 2d
DistLion, every GPU    G(M-1)/M * d/8  (all_to_all)           (G-1)/N * d/8 + (N-1)/N * d/8
votes (flat, G=1 API)  + (N-1)/N * d/8 (ring all_gather)
DistLion, nodes vote   2(M-1)/M * d/8  (two-phase over M)     (G-1)/G * 4d (fp32 reduce-scatter)
(ranks_per_node=G)                                            + (G-1)/G * p*d (all-gather, p bytes)
=====================  =====================================  ===================================

Assumptions: NCCL orders a ring by node, so a ring leaves each node once, and R rings
(channels) split the bytes over the R rails. NCCL's all_to_all is point to point: each
GPU's chunk for every GPU of another node crosses (flat DistLion: each GPU sends
(N-1)/N * d/8, of which (N-G)/N * d/8 to other nodes). Its all_gather is a ring (one
crossing per node; a point-to-point all_gather would cross G(M-1)/M * d/8 instead, as the
all_to_all). Node-level DistLion's voters are one GPU per node, so all their vote bytes
cross, 1/G of the bucket each. The ring and the flat exchange use NVLink and the NICs at
once (time: the slower of the two); node-level DistLion reduce-scatters, votes and
all-gathers in sequence (time: the sum; buckets pipeline in practice, so this is an upper
bound). Every message step costs alpha; NIC bytes get the calibrated bytes factor, wire
overhead and efficiency above, NVLink runs at its nominal V::

    python -m benchmarks.scaling
    python -m benchmarks.scaling --alpha_us 5 --gbits 100 400
    python -m benchmarks.scaling --gpus_per_node 8 --rails 1 --intra_gbytes 450
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from benchmarks import harness

SCHEMES = ("allreduce_fp32", "allreduce_bf16", "distlion_two_phase", "distlion_all_gather")
# Measured configuration (comm_volume.py) behind each scheme's bytes factor.
MEASURED_AS = {"allreduce_fp32": "ddp_fp32", "allreduce_bf16": "ddp_bf16",
               "distlion_two_phase": "distlion_two_phase_majority",
               "distlion_all_gather": "distlion_all_gather_majority"}
MODELS = {"125M": 125e6, "1.3B": 1.3e9, "7B": 7e9, "13B": 13e9, "70B": 70e9}
WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def latency_steps(scheme: str, n: int) -> int:
    return n - 1 if scheme == "distlion_all_gather" else 2 * (n - 1)


def ideal_bytes(scheme: str, d: float, n: int) -> float:
    return {"allreduce_fp32": 2 * (n - 1) / n * 4 * d, "allreduce_bf16": 2 * (n - 1) / n * 2 * d,
            "distlion_two_phase": 2 * (n - 1) / n * d / 8, "distlion_all_gather": (n - 1) * d / 8}[scheme]


def comm_time(scheme: str, d: float, n: int, gbits: float, calibration: dict) -> float:
    """Seconds of communication per step for one rank."""
    wire = ideal_bytes(scheme, d, n) * calibration["bytes_factor"][scheme] * calibration["wire_overhead"]
    return latency_steps(scheme, n) * calibration["alpha_s"] + wire * 8 / (gbits * 1e9 * calibration["efficiency"])


def _newest(pattern: str) -> str | None:
    paths = sorted(p for p in glob.glob(os.path.join(harness.RESULTS_DIR, pattern)) if "smoke" not in p)
    return paths[-1] if paths else None


def calibrate(alpha_us: float) -> dict:
    """Read the measured factors from the newest results; ideal values where none are there."""
    calibration = {"alpha_s": alpha_us * 1e-6, "bytes_factor": {s: 1.0 for s in SCHEMES}, "efficiency": 1.0,
                   "wire_overhead": 1.0, "sources": {}}
    volume = _newest("comm_volume-*.json")
    if volume is not None:
        with open(volume) as f:
            rows = json.load(f)["rows"]
        n = max(r["world_size"] for r in rows)
        measured = {r["config"]: r for r in rows if r["world_size"] == n}
        for scheme, config in MEASURED_AS.items():
            if config in measured:
                calibration["bytes_factor"][scheme] = (measured[config]["bytes_per_step_per_rank"]
                                                       / measured[config]["ideal_bytes"])
        calibration["sources"]["bytes_factor"] = f"{os.path.basename(volume)} (N={n})"
    link = _newest("netlink-*.json")
    if link is not None:
        with open(link) as f:
            runs = [r for r in json.load(f)["runs"] if r["rate"] == "1gbit"]
        if runs:
            run = max(runs, key=lambda r: r["world_size"])
            ddp, phase = run["adamw_ddp"], run["adamw_ddp_phase"]
            # The phase is all-reduce + AdamW step; the overlapped trainer's phase is the AdamW step alone.
            allreduce_s = phase["phase_s"] - ddp["phase_s"]
            calibration["wire_overhead"] = phase["wire_tx_bytes_per_step"] / phase["bytes_sent_per_step"]
            if allreduce_s > 0:
                calibration["efficiency"] = min(1.0, phase["wire_tx_bytes_per_step"] * 8 / allreduce_s / 1e9)
            calibration["sources"]["efficiency"] = f"{os.path.basename(link)} (N={run['world_size']}, 1gbit)"
    return calibration


# --------------------------------------------------------------------- nodes of G GPUs

NODE_SCHEMES = ("ddp_fp32", "ddp_bf16", "distlion_flat", "distlion_nodes")
# The one-GPU-per-node scheme whose calibrated bytes factor each node scheme's NIC bytes get.
NODE_CALIBRATED_AS = {"ddp_fp32": "allreduce_fp32", "ddp_bf16": "allreduce_bf16",
                      "distlion_flat": "distlion_two_phase", "distlion_nodes": "distlion_two_phase"}
NODE_COUNTS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
TARGET_NODES_OVER_FP32 = 28  # the target for node-level DistLion's inter-node bytes at G = 8


class Cluster:
    """M nodes of G GPUs; R NICs of ``gbits`` Gbit/s per node, NVLink of ``intra_gbytes`` GB/s per GPU."""

    def __init__(self, nodes: int, gpus_per_node: int, rails: int, gbits: float, intra_gbytes: float):
        bad = [f"{name}={value}" for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node),
                                                     ("rails", rails), ("gbits", gbits),
                                                     ("intra_gbytes", intra_gbytes)) if not value > 0]
        if bad:
            raise ValueError(f"Cluster needs positive sizes and speeds; got {', '.join(bad)}")
        self.nodes, self.gpus_per_node, self.rails = nodes, gpus_per_node, rails
        self.gbits, self.intra_gbytes = gbits, intra_gbytes

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def inter_node_bytes(scheme: str, d: float, cluster: Cluster) -> float:
    """Ideal payload bytes that leave one node per step (the table in the module docstring)."""
    m, g, n = cluster.nodes, cluster.gpus_per_node, cluster.world_size
    return {"ddp_fp32": 2 * (n - 1) / n * 4 * d, "ddp_bf16": 2 * (n - 1) / n * 2 * d,
            "distlion_flat": g * (m - 1) / m * d / 8 + (n - 1) / n * d / 8 if m > 1 else 0.0,
            "distlion_nodes": 2 * (m - 1) / m * d / 8}[scheme]


def intra_node_bytes(scheme: str, d: float, cluster: Cluster, param_bytes: int = 4) -> float:
    """Payload bytes one GPU sends over NVLink per step (``param_bytes``: the parameters' dtype size)."""
    g, n = cluster.gpus_per_node, cluster.world_size
    return {"ddp_fp32": 2 * (n - 1) / n * 4 * d, "ddp_bf16": 2 * (n - 1) / n * 2 * d,
            "distlion_flat": (g - 1) / n * d / 8 + (n - 1) / n * d / 8,
            "distlion_nodes": (g - 1) / g * (4 + param_bytes) * d}[scheme]


def node_latency_steps(scheme: str, cluster: Cluster) -> int:
    m, g, n = cluster.nodes, cluster.gpus_per_node, cluster.world_size
    if scheme != "distlion_nodes":
        return 2 * (n - 1)
    vote = 0 if m == 1 else (m - 1 if m <= 2 else 2 * (m - 1))  # exchange="auto": all-gather for M <= 2
    return vote + 2 * (g - 1)  # + the node's reduce-scatter and all-gather rings


def node_comm_time(scheme: str, d: float, cluster: Cluster, calibration: dict, param_bytes: int = 4) -> float:
    """Seconds of communication per step on a cluster of nodes (assumptions in the module docstring)."""
    factor = calibration["bytes_factor"][NODE_CALIBRATED_AS[scheme]] * calibration["wire_overhead"]
    nic = (inter_node_bytes(scheme, d, cluster) * factor * 8
           / (cluster.rails * cluster.gbits * 1e9 * calibration["efficiency"]))
    nvlink = intra_node_bytes(scheme, d, cluster, param_bytes) / (cluster.intra_gbytes * 1e9)
    moved = nic + nvlink if scheme == "distlion_nodes" else max(nic, nvlink)
    return node_latency_steps(scheme, cluster) * calibration["alpha_s"] + moved


def project_nodes(gbits_list: list[float], calibration: dict, models: dict, node_counts, gpus_per_node: int,
                  rails: int, intra_gbytes: float) -> list[dict]:
    """Inter-node bytes per node and communication time per step, for every link speed, model and M."""
    rows = []
    for gbits in gbits_list:
        for model, d in models.items():
            for m in node_counts:
                cluster = Cluster(m, gpus_per_node, rails, gbits, intra_gbytes)
                inter = {s: inter_node_bytes(s, d, cluster) * calibration["bytes_factor"][NODE_CALIBRATED_AS[s]]
                         * calibration["wire_overhead"] for s in NODE_SCHEMES}
                times = {s: node_comm_time(s, d, cluster, calibration) for s in NODE_SCHEMES}
                rows.append({"gbits_per_rail": gbits, "rails": rails, "gpus_per_node": gpus_per_node,
                             "intra_gbytes": intra_gbytes, "model": model, "num_parameters": d, "nodes": m,
                             "world_size": cluster.world_size, "inter_node_bytes_per_node": inter,
                             "intra_node_bytes_per_gpu": {s: intra_node_bytes(s, d, cluster) for s in NODE_SCHEMES},
                             "seconds": times,
                             "fp32_over_nodes_bytes": inter["ddp_fp32"] / inter["distlion_nodes"],
                             "fp32_over_flat_bytes": inter["ddp_fp32"] / inter["distlion_flat"],
                             "fp32_over_nodes_time": times["ddp_fp32"] / times["distlion_nodes"],
                             "bf16_over_nodes_time": times["ddp_bf16"] / times["distlion_nodes"]})
    return rows


def print_node_tables(rows: list[dict], model: str) -> None:
    first = rows[0]
    g, rails = first["gpus_per_node"], first["rails"]
    print(f"\nNodes of G = {g} GPUs, {rails} NIC(s) per node, NVLink {first['intra_gbytes']:g} GB/s per GPU; "
          f"{model} parameters")
    picked = [r for r in rows if r["model"] == model]
    print("inter-node bytes per node per step (GB) and bits per parameter; ratios are DDP fp32 / scheme")
    head = "  ".join(f"{s:>15}" for s in NODE_SCHEMES)
    target = f">= {TARGET_NODES_OVER_FP32}x"
    print(f"{'M':>5} {'N':>6}  {head}  {'fp32/flat':>9} {'fp32/nodes':>10} {target:>6}")
    for r in (r for r in picked if r["gbits_per_rail"] == first["gbits_per_rail"]):
        inter = r["inter_node_bytes_per_node"]
        cells = "  ".join(f"{inter[s] / 1e9:7.2f} {inter[s] * 8 / r['num_parameters']:5.1f}b" for s in NODE_SCHEMES)
        met = "yes" if r["fp32_over_nodes_bytes"] >= TARGET_NODES_OVER_FP32 else "NO"
        print(f"{r['nodes']:>5} {r['world_size']:>6}  {cells}  {r['fp32_over_flat_bytes']:8.1f}x "
              f"{r['fp32_over_nodes_bytes']:9.1f}x {met:>6}")
    for gbits in sorted({r["gbits_per_rail"] for r in picked}):
        print(f"\n{gbits:g} Gbit/s per rail ({gbits * rails:g} Gbit/s per node): communication ms per step")
        print(f"{'M':>5} {'N':>6}  {head}  {'fp32/nodes':>10}")
        for r in (r for r in picked if r["gbits_per_rail"] == gbits):
            cells = "  ".join(f"{r['seconds'][s] * 1e3:15,.1f}" for s in NODE_SCHEMES)
            print(f"{r['nodes']:>5} {r['world_size']:>6}  {cells}  {r['fp32_over_nodes_time']:9.1f}x")


def project(gbits_list: list[float], calibration: dict, models: dict, world_sizes) -> list[dict]:
    rows = []
    for gbits in gbits_list:
        for model, d in models.items():
            for n in world_sizes:
                times = {s: comm_time(s, d, n, gbits, calibration) for s in SCHEMES}
                rows.append({"gbits": gbits, "model": model, "num_parameters": d, "world_size": n,
                             "seconds": times,
                             "fp32_over_two_phase": times["allreduce_fp32"] / times["distlion_two_phase"],
                             "bf16_over_two_phase": times["allreduce_bf16"] / times["distlion_two_phase"]})
    return rows


def print_table(rows: list[dict], shown_sizes) -> None:
    head = "  ".join(f"{s:>20}" for s in SCHEMES)
    for gbits in sorted({r["gbits"] for r in rows}):
        print(f"\n{gbits:g} Gbit/s links: communication ms per step per rank")
        print(f"{'model':>6} {'N':>5}  {head}  {'fp32/2-phase':>12}")
        for r in rows:
            if r["gbits"] != gbits or r["world_size"] not in shown_sizes:
                continue
            cells = "  ".join(f"{r['seconds'][s] * 1e3:20,.1f}" for s in SCHEMES)
            print(f"{r['model']:>6} {r['world_size']:>5}  {cells}  {r['fp32_over_two_phase']:11.1f}x")


def plot(rows: list[dict], path: str, model: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    speeds = sorted({r["gbits"] for r in rows})
    fig, axes = plt.subplots(1, len(speeds), figsize=(4.2 * len(speeds), 3.8), sharey=True, squeeze=False)
    for axis, gbits in zip(axes[0], speeds):
        picked = [r for r in rows if r["gbits"] == gbits and r["model"] == model]
        for scheme in SCHEMES:
            axis.plot([r["world_size"] for r in picked], [r["seconds"][scheme] * 1e3 for r in picked], marker=".",
                      label=scheme.replace("_", " "))
        axis.set(xscale="log", yscale="log", xlabel="workers N", title=f"{model} parameters, {gbits:g} Gbit/s")
        axis.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("communication per step (ms)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gbits", type=float, nargs="+", default=[25, 100, 400],
                        help="link speeds in Gbit/s (with nodes: per rail)")
    parser.add_argument("--alpha_us", type=float, default=10.0, help="latency per message in microseconds")
    parser.add_argument("--plot_model", choices=sorted(MODELS), default="7B", help="model of the plot and node tables")
    parser.add_argument("--gpus_per_node", type=harness.positive_int, default=8, help="G, GPUs per node")
    parser.add_argument("--rails", type=harness.positive_int, default=None,
                        help="NICs per node, each of --gbits (default: one per GPU)")
    parser.add_argument("--intra_gbytes", type=float, default=450.0,
                        help="NVLink GB/s per GPU and direction (H100: 450)")
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.gbits) <= 0 or args.alpha_us < 0 or args.intra_gbytes <= 0:
        parser.error(f"--gbits {args.gbits} and --intra_gbytes {args.intra_gbytes} must be positive and "
                     f"--alpha_us {args.alpha_us} non-negative")
    models, world_sizes = (dict(list(MODELS.items())[:1]), WORLD_SIZES[:2]) if args.smoke \
        else (MODELS, WORLD_SIZES)
    calibration = calibrate(args.alpha_us)
    print("calibration: " + json.dumps({k: v for k, v in calibration.items()}, indent=None))
    rows = project(args.gbits, calibration, models, world_sizes)
    print_table(rows, shown_sizes=world_sizes if args.smoke else (8, 64, 512, 4096))
    payload = {"model": "alpha-beta, ring all-reduce vs DistLion exchanges", "calibration": calibration,
               "rows": rows}
    path = harness.write_results("scaling", payload, args.out, args.smoke)
    plotted = plot(rows, path[:-len(".json")] + ".png", args.plot_model if not args.smoke else "125M")
    if plotted:
        print(f"plot: {path[:-len('.json')]}.png")
    rails = args.rails or args.gpus_per_node
    node_rows = project_nodes(args.gbits, calibration, models, NODE_COUNTS[:2] if args.smoke else NODE_COUNTS,
                              args.gpus_per_node, rails, args.intra_gbytes)
    print_node_tables(node_rows, list(models)[0] if args.smoke else args.plot_model)
    by_nodes = {r["nodes"]: r["fp32_over_nodes_bytes"] for r in node_rows}
    print(f"\nDDP fp32 / node-level DistLion inter-node bytes at G = {args.gpus_per_node}: "
          + ", ".join(f"M={m}: {ratio:.1f}x" for m, ratio in by_nodes.items())
          + f" (target >= {TARGET_NODES_OVER_FP32}x: "
          + ("met)" if min(by_nodes.values()) >= TARGET_NODES_OVER_FP32 else "NOT met)"))
    harness.write_results("scaling-nodes", {
        "model": "alpha-beta, nodes of G GPUs: NCCL rings and all_to_all over NICs (rails) and NVLink",
        "assumptions": __doc__.split("**Nodes of G GPUs**")[1].strip(), "calibration": calibration,
        "gpus_per_node": args.gpus_per_node, "rails": rails, "intra_gbytes": args.intra_gbytes,
        "target_fp32_over_nodes_bytes": TARGET_NODES_OVER_FP32, "fp32_over_nodes_bytes_by_nodes": by_nodes,
        "rows": node_rows}, args.out, args.smoke)
    return {**payload, "node_rows": node_rows}


if __name__ == "__main__":
    main()
