"""Per-point aggregates from per-request records (the only source of every number)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from loadtest.records import Distribution, LoadPoint, PointSummary, RequestRecord, ServerFigures
from loadtest.slo import meets_slo

PERCENTILES = (50, 90, 95, 99)


def distribution(values: Iterable[float]) -> Distribution:
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return Distribution()
    p50, p90, p95, p99 = (float(v) for v in np.percentile(data, PERCENTILES))
    return Distribution(count=int(data.size), mean=float(data.mean()), p50=p50, p90=p90,
                        p95=p95, p99=p99, max=float(data.max()))


def tpot_ms(e2e_ms: float, ttft_ms: float, output_tokens: int) -> float | None:
    """(E2E - TTFT) / (output tokens - 1): undefined for a single token."""
    if output_tokens < 2:
        return None
    return (e2e_ms - ttft_ms) / (output_tokens - 1)


def benchmark_duration_s(records: list[RequestRecord]) -> float:
    """From the first send to the last answer of the point."""
    finished = [r.start_ms + r.e2e_ms for r in records if r.e2e_ms is not None]
    if not records or not finished:
        return 0.0
    return (max(finished) - min(r.start_ms for r in records)) / 1e3


def summarise_point(point: int, load: LoadPoint, records: list[RequestRecord],
                    slo: dict[str, float],
                    server: ServerFigures | None = None) -> PointSummary:
    done = [r for r in records if r.ok]
    duration = benchmark_duration_s(records)
    per_s = (1.0 / duration) if duration > 0 else 0.0
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    goodput = attainment = None
    if slo:
        met = sum(meets_slo(r, slo) for r in records)
        goodput = met * per_s
        attainment = met / len(records) if records else 0.0
    errors = Counter(r.error_type or "unknown" for r in records if not r.ok)
    return PointSummary(
        point=point,
        load=load,
        num_requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        errors=dict(sorted(errors.items())),
        duration_s=duration,
        request_throughput=len(done) * per_s,
        input_throughput=input_tokens * per_s,
        output_throughput=output_tokens * per_s,
        total_throughput=(input_tokens + output_tokens) * per_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        goodput=goodput,
        slo_attainment=attainment,
        ttft_ms=distribution(r.ttft_ms for r in done if r.ttft_ms is not None),
        tpot_ms=distribution(r.tpot_ms for r in done if r.tpot_ms is not None),
        itl_ms=distribution(gap for r in done for gap in r.itl_ms),
        e2e_ms=distribution(r.e2e_ms for r in done if r.e2e_ms is not None),
        server=server or ServerFigures(),
    )
