"""PNG figures of one run or several overlaid (one curve per configuration).

- ttft_vs_tpot.png: one point per load (rate or concurrency), the latency trade-off.
- ttft_cdf.png, tpot_cdf.png: distributions per load point.
- throughput_vs_load.png: output tokens/s and requests/s against the offered load.
- slo_attainment.png: share of requests within every SLO against the load (DistServe's
  figure), when SLOs were given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loadtest.records import Distribution, PointSummary, RequestRecord, RunSummary

Run = tuple[RunSummary, list[RequestRecord]]
STATS = ("mean", "p50", "p90", "p95", "p99")


def _load_value(run: RunSummary, point: PointSummary) -> float:
    if run.sweep == "concurrency" and point.load.max_concurrency is not None:
        return float(point.load.max_concurrency)
    return point.load.request_rate


def _load_label(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def _point_label(run: RunSummary, point: PointSummary) -> str:
    """"2/s" for a rate, "c=8" for a concurrency: what the point offered."""
    value = _load_value(run, point)
    if run.sweep == "concurrency" and point.load.max_concurrency is not None:
        return f"c={value:g}"
    return "all at once" if math.isinf(value) else f"{value:g}/s"


class LoadAxis:
    """x positions for offered load: numeric, or evenly spaced when a rate is infinite."""

    def __init__(self, runs: list[RunSummary]) -> None:
        concurrency = all(run.sweep == "concurrency" for run in runs)
        self.title = "max concurrency" if concurrency else "offered request rate (req/s)"
        values = sorted({_load_value(run, p) for run in runs for p in run.points})
        self.categorical = any(math.isinf(v) for v in values)
        self.values = values

    def x(self, run: RunSummary, point: PointSummary) -> float:
        value = _load_value(run, point)
        return float(self.values.index(value)) if self.categorical else value

    def decorate(self, ax: Axes) -> None:
        ax.set_xlabel(self.title)
        if self.categorical:
            ax.set_xticks(range(len(self.values)), [_load_label(v) for v in self.values])


def _stat(dist: Distribution, stat: str) -> float | None:
    value: float | None = getattr(dist, stat)
    return value


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_ttft_vs_tpot(runs: list[Run], path: Path, stat: str = "p50") -> Path:
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for summary, _ in runs:
        points: list[tuple[PointSummary, float, float]] = []
        for p in summary.points:
            x, y = _stat(p.tpot_ms, stat), _stat(p.ttft_ms, stat)
            if x is not None and y is not None:
                points.append((p, x, y))
        if not points:
            continue
        ax.plot([x for _, x, _ in points], [y for _, _, y in points], marker="o",
                label=summary.label)
        for p, x, y in points:
            ax.annotate(_point_label(summary, p), (x, y),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"TPOT {stat} (ms)")
    ax.set_ylabel(f"TTFT {stat} (ms)")
    ax.set_title("TTFT vs TPOT (labels: offered load)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_cdf(runs: list[Run], path: Path, metric: str) -> Path:
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    several = len(runs) > 1
    for summary, records in runs:
        for point in summary.points:
            values = np.sort([
                v for r in records
                if r.point == point.point and r.ok and (v := getattr(r, metric)) is not None
            ])
            if values.size == 0:
                continue
            label = f"{summary.label} {point.load.name}" if several else point.load.name
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                    label=label)
    ax.set_xlabel(f"{metric.removesuffix('_ms').upper()} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"CDF of {metric.removesuffix('_ms').upper()}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _against_load(runs: list[Run], ax: Axes, axis: LoadAxis,
                  value: Callable[[PointSummary], float | None]) -> None:
    for summary, _ in runs:
        xy = sorted((axis.x(summary, p), y) for p in summary.points
                    if (y := value(p)) is not None)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=summary.label)
    axis.decorate(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot_throughput(runs: list[Run], path: Path) -> Path:
    axis = LoadAxis([s for s, _ in runs])
    fig = Figure(figsize=(11, 4.5))
    tokens, requests = fig.subplots(1, 2)
    _against_load(runs, tokens, axis, lambda p: p.output_throughput)
    tokens.set_ylabel("output tokens/s")
    tokens.set_title("output throughput")
    _against_load(runs, requests, axis, lambda p: p.request_throughput)
    requests.set_ylabel("completed requests/s")
    requests.set_title("request throughput")
    if not axis.categorical and axis.title.startswith("offered"):
        top = max(axis.values)
        requests.plot([0, top], [0, top], linestyle="--", color="grey", label="offered")
        requests.legend(fontsize=8)
    return _save(fig, path)


def plot_slo_attainment(runs: list[Run], path: Path) -> Path:
    axis = LoadAxis([s for s, _ in runs])
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    _against_load(runs, ax, axis,
                  lambda p: None if p.slo_attainment is None else 100 * p.slo_attainment)
    slos = {", ".join(f"{k} <= {v:g}" for k, v in s.slo.items()) for s, _ in runs if s.slo}
    ax.set_ylabel("requests within SLO (%)")
    ax.set_ylim(0, 105)
    ax.set_title("SLO attainment: " + " | ".join(sorted(slos)))
    return _save(fig, path)


def write_plots(runs: list[Run], out_dir: Path, stat: str = "p50") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot_ttft_vs_tpot(runs, out_dir / "ttft_vs_tpot.png", stat),
        plot_cdf(runs, out_dir / "ttft_cdf.png", "ttft_ms"),
        plot_cdf(runs, out_dir / "tpot_cdf.png", "tpot_ms"),
        plot_throughput(runs, out_dir / "throughput_vs_load.png"),
    ]
    if any(summary.slo for summary, _ in runs):
        written.append(plot_slo_attainment(runs, out_dir / "slo_attainment.png"))
    return written
