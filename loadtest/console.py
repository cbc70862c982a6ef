"""Tables on the terminal (rich): throughput and errors, then latencies, one row per point."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from loadtest.records import Distribution, PointSummary, RunSummary, ServerFigures

console = Console()
LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def _ms(dist: Distribution, stat: str) -> str:
    value = getattr(dist, stat)
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _server(figures: ServerFigures) -> str:
    if not figures.available:
        return "-"
    parts = []
    if figures.prefix_hit_rate is not None:
        parts.append(f"prefix hit {figures.prefix_hit_rate:.0%}")
    if figures.kv_usage_max is not None:
        parts.append(f"KV max {figures.kv_usage_max:.0%}")
    if figures.kv_transfer_bytes is not None:
        parts.append(f"{figures.kv_transfer_bytes / 2**20:.1f} MiB relayed")
    return ", ".join(parts) or "scraped"


def _rows(runs: list[RunSummary]) -> list[tuple[str, PointSummary]]:
    several = len(runs) > 1
    return [(f"{run.label} {p.load.name}" if several else p.load.name, p)
            for run in runs for p in run.points]


def throughput_table(runs: list[RunSummary]) -> Table:
    with_slo = any(run.slo for run in runs)
    table = Table(title="throughput")
    for column in ("load", "ok", "req/s", "in tok/s", "out tok/s"):
        table.add_column(column, justify="left" if column == "load" else "right")
    if with_slo:
        table.add_column("goodput req/s", justify="right")
        table.add_column("SLO met", justify="right")
    table.add_column("errors")
    table.add_column("server /metrics")
    table.add_column("host load", justify="right")
    for name, point in _rows(runs):
        row = [name, f"{point.completed}/{point.num_requests}",
               _num(point.request_throughput), _num(point.input_throughput, "{:.1f}"),
               _num(point.output_throughput, "{:.1f}")]
        if with_slo:
            row += [_num(point.goodput), _num(point.slo_attainment, "{:.0%}")]
        errors = ", ".join(f"{k}: {v}" for k, v in point.errors.items()) or "-"
        table.add_row(*row, errors, _server(point.server), _num(point.host_load_avg, "{:.1f}"))
    return table


def latency_table(runs: list[RunSummary]) -> Table:
    table = Table(title="latency (ms): p50 / p90 / p99")
    table.add_column("load")
    for title, _ in LATENCIES:
        table.add_column(title, justify="right")
    for name, point in _rows(runs):
        cells = [" / ".join(_ms(getattr(point, key), s) for s in ("p50", "p90", "p99"))
                 for _, key in LATENCIES]
        table.add_row(name, *cells)
    return table


def print_run(summary: RunSummary) -> None:
    slo = ", ".join(f"{k} <= {v:g}" for k, v in summary.slo.items())
    console.print(f"[bold]{summary.label}[/]: {summary.model} at {summary.base_url} "
                  f"({summary.endpoint}, dataset {summary.dataset.get('name')}, tokens "
                  f"{'exact' if summary.token_counts_exact else 'approximate'})"
                  + (f", SLO {slo}" if slo else ""))
    console.print(throughput_table([summary]))
    console.print(latency_table([summary]))


def print_comparison(runs: list[RunSummary]) -> None:
    console.print("[bold]comparison[/]: " + ", ".join(run.label for run in runs))
    console.print(throughput_table(runs))
    console.print(latency_table(runs))
