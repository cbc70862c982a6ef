"""Aggregates of the load tester: percentiles, TPOT, goodput, arrivals, SLO parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.arrivals import arrival_offsets
from loadtest.records import LoadPoint, RequestRecord
from loadtest.slo import meets_slo, parse_slo
from loadtest.stats import distribution, summarise_point, tpot_ms


def _record(index: int, ok: bool = True, ttft: float = 100.0, e2e: float = 500.0,
            tokens: int = 5, error: str | None = None, start: float = 0.0) -> RequestRecord:
    return RequestRecord(
        point=0, request_index=index, session_id=index, start_ms=start, ok=ok,
        error_type=error, requested_output_tokens=tokens, prompt_tokens=10,
        prompt_tokens_source="usage", output_tokens=tokens if ok else 0,
        ttft_ms=ttft if ok else None, e2e_ms=e2e,
        tpot_ms=tpot_ms(e2e, ttft, tokens) if ok else None,
        itl_ms=[(e2e - ttft) / (tokens - 1)] * (tokens - 1) if ok and tokens > 1 else [],
    )


def test_distribution_uses_numpy_linear_percentiles() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    dist = distribution(values)
    assert dist.count == 6
    assert dist.mean == pytest.approx(np.mean(values))
    assert dist.p50 == pytest.approx(np.percentile(values, 50))
    assert dist.p99 == pytest.approx(np.percentile(values, 99))
    assert dist.max == 9.0
    assert distribution([]).p50 is None


def test_tpot_excludes_the_first_token() -> None:
    assert tpot_ms(e2e_ms=1100.0, ttft_ms=100.0, output_tokens=11) == pytest.approx(100.0)
    assert tpot_ms(e2e_ms=100.0, ttft_ms=100.0, output_tokens=1) is None


def test_summary_counts_throughput_errors_and_goodput() -> None:
    records = [
        _record(0, ttft=100, e2e=500, start=0),
        _record(1, ttft=300, e2e=900, start=100),     # TTFT over the SLO
        _record(2, ok=False, error="http_503", e2e=10, start=200),
        _record(3, ttft=150, e2e=1000, start=300, tokens=1),  # no TPOT: no violation
    ]
    summary = summarise_point(0, LoadPoint(request_rate=4.0), records,
                              slo={"ttft_ms": 200, "tpot_ms": 150})
    assert summary.duration_s == pytest.approx(1.3)  # first send (0) to last answer (1300)
    assert summary.completed == 3 and summary.failed == 1
    assert summary.errors == {"http_503": 1}
    assert summary.request_throughput == pytest.approx(3 / 1.3)
    assert summary.total_output_tokens == 11
    assert summary.output_throughput == pytest.approx(11 / 1.3)
    assert summary.input_throughput == pytest.approx(30 / 1.3)
    assert summary.slo_attainment == pytest.approx(2 / 4)
    assert summary.goodput == pytest.approx(2 / 1.3)
    assert summary.tpot_ms.count == 2
    assert summary.itl_ms.count == 8


def test_slo_parsing_and_checks() -> None:
    assert parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo(None) == {}
    with pytest.raises(ValueError):
        parse_slo("latency=3")
    with pytest.raises(ValueError):
        parse_slo("ttft_ms=-1")
    assert meets_slo(_record(0, ttft=100, e2e=500), {"e2e_ms": 500})
    assert not meets_slo(_record(0, ttft=100, e2e=501), {"e2e_ms": 500})
    assert not meets_slo(_record(0, ok=False, error="timeout"), {})


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_keep_the_rate_and_vary_with_burstiness(burstiness: float) -> None:
    offsets = arrival_offsets(20000, 8.0, burstiness, np.random.default_rng(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    # A gamma gap's squared coefficient of variation is 1/shape.
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.08)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(3, math.inf, 1.0, np.random.default_rng(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 1.0, np.random.default_rng(0))
