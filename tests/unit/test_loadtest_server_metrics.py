"""Figures from Prometheus text: kvrelay's names, vLLM's and SGLang's."""

from __future__ import annotations

import pytest

from loadtest.server_metrics import figures, parse_metrics

VLLM_BEFORE = """
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{model_name="m"} 100.0
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{model_name="m"} 400.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.1
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 3.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 3.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 2.5
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 5.0
"""
VLLM_AFTER = (VLLM_BEFORE.replace("} 100.0", "} 400.0").replace("} 400.0\n# TYPE vllm:kv",
              "} 1000.0\n# TYPE vllm:kv").replace("} 0.1", "} 0.6")
              .replace("_count{model_name=\"m\"} 3.0", "_count{model_name=\"m\"} 9.0"))


def test_vllm_prefix_hit_rate_kv_usage_and_counters() -> None:
    before, after = parse_metrics(VLLM_BEFORE), parse_metrics(VLLM_AFTER)
    during = parse_metrics(VLLM_BEFORE.replace("} 0.1", "} 0.9"))
    out = figures(before, after, [during, after])
    assert out.prefix_hit_rate == pytest.approx(300 / 600)
    assert out.kv_usage_max == pytest.approx(0.9)
    assert out.kv_usage_mean == pytest.approx((0.9 + 0.6) / 2)
    assert out.counters['vllm:e2e_request_latency_seconds_count{model_name="m"}'] == 6.0
    assert not any(k.startswith("python_") for k in out.counters)
    assert not any("_bucket" in k for k in out.counters)


def test_sglang_hit_rate_gauge_and_kvrelay_untyped_counters() -> None:
    sglang = "# TYPE sglang:cache_hit_rate gauge\nsglang:cache_hit_rate 0.42\n"
    out = figures(parse_metrics(sglang), parse_metrics(sglang), [parse_metrics(sglang)])
    assert out.prefix_hit_rate == pytest.approx(0.42)
    # Exporters that write no TYPE line (or put it on the family name) still count.
    untyped = "kvrelay_kv_transfer_bytes_total{worker=\"p0\"} {n}\n"
    out = figures(parse_metrics(untyped.replace("{n}", "10")),
                  parse_metrics(untyped.replace("{n}", "4106")), [])
    assert out.kv_transfer_bytes == 4096
