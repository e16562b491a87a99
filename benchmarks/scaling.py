"""Project communication time per step to clusters with an alpha-beta (latency-bandwidth) model.

For N workers, a model of d parameters and links of B bit/s, one collective of M bytes
per rank costs ``steps * alpha + M / (efficiency * B)``:

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
Only communication is projected: the optimizer's local arithmetic is not::

    python -m benchmarks.scaling
    python -m benchmarks.scaling --alpha_us 5 --gbits 100 400
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
    parser.add_argument("--gbits", type=float, nargs="+", default=[25, 100, 400], help="link speeds in Gbit/s")
    parser.add_argument("--alpha_us", type=float, default=10.0, help="latency per message in microseconds")
    parser.add_argument("--plot_model", choices=sorted(MODELS), default="7B")
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.gbits) <= 0 or args.alpha_us < 0:
        parser.error(f"--gbits {args.gbits} must be positive and --alpha_us {args.alpha_us} non-negative")
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
    return payload


if __name__ == "__main__":
    main()
