"""`kvrelay bench compare a.json b.json ...`: one table and the plots overlaid."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtest.console import print_comparison
from loadtest.plots import STATS, Run, write_plots
from loadtest.records import RunSummary
from loadtest.results import load_run


def unique_labels(runs: list[Run]) -> list[Run]:
    """Runs named alike (two runs of one config) get their file's folder added."""
    seen: dict[str, int] = {}
    for summary, _ in runs:
        seen[summary.label] = seen.get(summary.label, 0) + 1
    out: list[Run] = []
    for index, (summary, records) in enumerate(runs):
        if seen[summary.label] > 1:
            summary = summary.model_copy(update={"label": f"{summary.label} #{index + 1}"})
        out.append((summary, records))
    return out


def compare(paths: list[Path], out_dir: Path | None, stat: str = "p50",
            plots: bool = True) -> list[RunSummary]:
    runs = unique_labels([load_run(p) for p in paths])
    summaries = [summary for summary, _ in runs]
    print_comparison(summaries)
    if plots and out_dir is not None:
        written = write_plots(runs, out_dir, stat)
        print(f"plots in {out_dir}/: " + ", ".join(p.name for p in written))
    return summaries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kvrelay bench compare",
        description="Compare runs: a table, and overlaid TTFT-vs-TPOT, CDF, throughput and "
                    "SLO plots.")
    parser.add_argument("summaries", nargs="+", type=Path,
                        help="summary.json files (or the folders holding them)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results/compare"))
    parser.add_argument("--plot-stat", choices=STATS, default="p50")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    compare(args.summaries, args.output_dir, args.plot_stat, plots=not args.no_plots)
    return 0
