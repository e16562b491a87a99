"""Compare training runs: a terminal table, ``report.json`` and ``report.png``.

``report.png`` shows validation loss against step and against bytes sent, and for
DistLion/Lion runs ||weight_decay * x||_inf against step (the box Lion keeps the
parameters in; ``DistLion.constraint_stats``).

Every number comes from the runs' ``metrics.json`` (written by ``launch.train``);
nothing here is a formula. ``machine_info()`` describes the machine for the reports
and the benchmarks (processor and cores, never the host name).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch

BASELINE = "adamw"


def machine_info() -> dict:
    """Describe this machine and software for a results file: no host name, no paths."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    except (OSError, ValueError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def today() -> str:
    return datetime.date.today().isoformat()


def command_line() -> str:
    """Return how this process was started, for a results file: ``python -m launch.demo --smoke``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [os.path.basename(sys.argv[0])]
    return " ".join(["python", *program, *sys.argv[1:]])


def _ranks_per_node(metrics: dict) -> int:
    return (metrics.get("comm_stats") or {}).get("ranks_per_node", 1)


def _label(metrics: dict) -> str:
    if metrics["optimizer"] == "distlion":
        nodes = _ranks_per_node(metrics)
        shape = f", {metrics['world_size'] // nodes} nodes x {nodes}" if nodes > 1 else ""
        return f"DistLion ({metrics['vote']}){shape}"
    return {"adamw": "AdamW + DDP", "lion": "Lion + DDP"}.get(metrics["optimizer"], metrics["optimizer"])


def _counted_bytes(metrics: dict) -> tuple[str, str]:
    """Which bytes a run's figures count: (``history`` key, description).

    A run of nodes (ranks_per_node > 1) counts the bytes sent to other nodes (the 1-bit
    vote) and leaves out the reduce-scatter and all-gather inside a node, which ride the
    node's own fast link; every other run counts all it sends.
    """
    if _ranks_per_node(metrics) > 1:
        return "inter_node_bytes_sent", "inter-node bytes only (the vote); intra-node traffic not counted"
    return "bytes_sent", "all bytes sent"


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def comparison(runs: dict[str, dict]) -> dict:
    """Return the table's numbers: per run, plus the ratios against the AdamW run when there is one."""
    baseline = runs.get(BASELINE)
    rows = {}
    for name, m in runs.items():
        key, counted = _counted_bytes(m)
        sent, per_step = m["bytes_sent"], m["bytes_sent_per_step"]
        if key != "bytes_sent":
            sent, per_step = m["comm_stats"][key], m["comm_stats"][key] / m["comm_stats"]["steps"]
        row = {
            "label": _label(m),
            "bytes_counted": counted,
            "final_val_loss": m["final_val_loss"],
            "bytes_sent_per_worker_per_step": per_step,
            "total_bytes_sent_all_workers": sent * m["world_size"] if sent is not None else None,
            "step_time_s": m["step_time_s"],
            "wall_time_s": m["wall_time_s"],
            "parameters_identical": m["parameters_identical"],
        }
        if baseline is not None and baseline["bytes_sent_per_step"] and per_step:
            row["bytes_ratio_adamw_over_this"] = baseline["bytes_sent_per_step"] / per_step
        if baseline is not None:
            row["val_loss_vs_adamw_percent"] = 100.0 * (m["final_val_loss"] / baseline["final_val_loss"] - 1.0)
        rows[name] = row
    return rows


def format_table(rows: dict[str, dict]) -> str:
    """Return the comparison as a fixed-width text table."""
    header = ("optimizer", "final val loss", "vs AdamW", "sent/worker/step", "total sent", "AdamW/this bytes",
              "time/step")
    lines = [header]
    for row in rows.values():
        ratio = row.get("bytes_ratio_adamw_over_this")
        delta = row.get("val_loss_vs_adamw_percent")
        lines.append((row["label"], f"{row['final_val_loss']:.4f}", "" if delta is None else f"{delta:+.2f}%",
                      _bytes(row["bytes_sent_per_worker_per_step"]), _bytes(row["total_bytes_sent_all_workers"]),
                      "" if ratio is None else f"{ratio:.1f}x", f"{row['step_time_s'] * 1e3:.0f} ms"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    text += [f"{row['label']}: bytes are {row['bytes_counted']}" for row in rows.values()
             if row["bytes_counted"] != "all bytes sent"]
    return "\n".join(text)


def _constraint_curves(metrics: dict) -> dict[str, list[tuple[int, float]]]:
    """Per param group with weight decay: (step, ||weight_decay * x||_inf) at each validation point
    (``history[i]["constraint"]``, DistLion and Lion runs); empty for runs without it."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in metrics["history"]:
        for index, group in enumerate((entry.get("constraint") or {}).get("groups", [])):
            if group["scaled_max"] is not None:
                curves.setdefault(f"group {index} (wd {group['weight_decay']:g})", []).append(
                    (entry["step"], group["scaled_max"]))
    return curves


def _plot_constraint(axis, runs: dict[str, dict]) -> None:
    """||weight_decay * x||_inf against step, one line per run and decayed param group; the box is <= 1."""
    for m in runs.values():
        for group, points in _constraint_curves(m).items():
            axis.plot([s for s, _ in points], [v for _, v in points], marker=".", label=f"{_label(m)}, {group}")
    axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label="box: ||wd*x||_inf = 1")
    axis.set(yscale="log", xlabel="step", ylabel="||weight_decay * x||_inf (log scale)",
             title="Lion's box: decaying into it (> 1), then inside")


def plot(runs: dict[str, dict], path: str) -> bool:
    """Draw validation loss against step and against bytes sent, and, for runs that logged
    ``constraint_stats``, ||weight_decay * x||_inf against step; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    boxed = {name: m for name, m in runs.items() if _constraint_curves(m)}
    fig, axes = plt.subplots(1, 3 if boxed else 2, figsize=(16.5 if boxed else 11, 4.2))
    by_step, by_bytes = axes[:2]
    for m in runs.values():
        history = m["history"]
        steps = [h["step"] for h in history]
        losses = [h["val_loss"] for h in history]
        line, = by_step.plot(steps, losses, marker=".", label=_label(m))
        key, _ = _counted_bytes(m)
        sent = [(h[key], h["val_loss"]) for h in history if h.get(key)]
        if sent:
            by_bytes.plot([s for s, _ in sent], [v for _, v in sent], marker=".", color=line.get_color(),
                          label=_label(m))
    first = next(iter(runs.values()))
    by_step.set(xlabel="step", ylabel="validation loss (nats/byte)",
                title=f"{first['world_size']} workers, equal steps and data")
    by_bytes.set(xscale="log", xlabel="bytes sent per worker (cumulative, log scale; nodes: inter-node only)",
                 ylabel="validation loss (nats/byte)", title="loss against communication")
    if boxed:
        _plot_constraint(axes[2], boxed)
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # e.g. no bytes counted in a one-process run
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(runs: dict[str, dict], out: str, extra: dict | None = None) -> dict:
    """Write ``report.json`` and ``report.png`` to ``out``; return the report."""
    os.makedirs(out, exist_ok=True)
    report = {"date": today(), "machine": machine_info(), "command": command_line(), **(extra or {}),
              "comparison": comparison(runs), "runs": runs}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    report["plotted"] = plot(runs, os.path.join(out, "report.png"))
    return report
