"""Observability of a real cluster: request ids in every service's log, metrics that move.

A gateway, a prefill and a decode worker (tiny random model, real Redis) serve known
requests; the workers' and the gateway's /metrics must change by exactly what those
requests imply, and `kvrelay status` must show both workers.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.redis_server import RedisServer
from shared.kv_pool import KVPool
from shared.observability.worker_metrics import worker_metrics
from shared.transfer.local_transport import LocalKvReceiver
from shared.transfer.messages import KvAbort, KvDone
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-observability"
BLOCK = 16
NUM_LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 64, 4, 2
# K and V of one page, every layer, float32.
PAGE_BYTES = NUM_LAYERS * 2 * BLOCK * KV_HEADS * (HIDDEN // HEADS) * 4
MAX_TOKENS = 4

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Cluster]:
    model_dir = build_tiny_llama(
        tmp_path_factory.mktemp("tiny-observability"),
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
    )
    redis_server.client().flushdb()
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("observability-cluster"),
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1", "--redis-url", redis_server.url],
        gateway_args=["--redis-url", redis_server.url, "--router-policy", "prefix"],
        metrics=True,
    )
    try:
        yield cluster
    finally:
        cluster.stop()
        redis_server.client().flushdb()


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels` (0 when none)."""
    return sum(
        v for (n, series), v in samples.items() if n == name and set(labels.items()) <= set(series)
    )


def has(samples: Samples, name: str) -> bool:
    return any(n == name for n, _ in samples)


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49000) for _ in range(count)]


def complete(
    cluster: Cluster, prompt: list[int], headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    response = httpx.post(
        f"{cluster.base_url}/v1/completions", json=body, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response


def wait_for_log(path: Path, text: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        content = path.read_text(errors="replace")
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.1)


def test_one_request_id_in_the_logs_of_gateway_prefill_and_decode(cluster: Cluster) -> None:
    response = complete(cluster, tokens(1, 40), headers={"X-Request-Id": "test-abc-123"})
    assert response.headers["x-request-id"] == "test-abc-123"
    for name in ("gateway", "prefill-0", "decode-0"):
        log = wait_for_log(cluster.log_dir / f"{name}.log", "test-abc-123")
        lines = [line for line in log.splitlines() if "test-abc-123" in line]
        assert lines, f"no line of {name} names the request:\n{log[-3000:]}"
        assert all(" INFO " in line or " DEBUG " in line for line in lines), lines


def test_the_gateway_makes_a_request_id_when_none_is_given(cluster: Cluster) -> None:
    first = complete(cluster, tokens(2, 20)).headers["x-request-id"]
    second = complete(cluster, tokens(3, 20)).headers["x-request-id"]
    assert first and second and first != second
    log = wait_for_log(cluster.log_dir / "decode-0.log", second)
    assert second in log


@pytest.mark.parametrize("bad", ["x" * 129, "caf\u00e9", "tab\there"])
def test_an_invalid_request_id_is_a_400(cluster: Cluster, bad: str) -> None:
    response = httpx.post(
        f"{cluster.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
        headers=[(b"X-Request-Id", bad.encode("utf-8"))],
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "X-Request-Id"


def test_metrics_move_as_the_requests_say(cluster: Cluster) -> None:
    gateway_url = f"{cluster.base_url}/metrics"
    prefill_url, decode_url = cluster.metrics_urls["prefill-0"], cluster.metrics_urls["decode-0"]
    gateway0, prefill0, decode0 = scrape(gateway_url), scrape(prefill_url), scrape(decode_url)
    idle_decode_pages = value(decode0, "kvrelay_worker_kv_pages_used")
    assert value(decode0, "kvrelay_worker_kv_page_bytes") == PAGE_BYTES
    assert value(prefill0, "kvrelay_worker_kv_page_bytes") == PAGE_BYTES

    # A prompt of 8 full blocks and a bit: 9 pages travel to decode.
    prefix = tokens(10, 8 * BLOCK)
    first = complete(cluster, [*prefix, *tokens(11, 5)]).json()
    prompt_tokens = first["usage"]["prompt_tokens"]
    pages = -(-prompt_tokens // BLOCK)
    assert pages == 9
    prefill1, decode1 = scrape(prefill_url), scrape(decode_url)
    received = value(decode1, "kvrelay_kv_transfer_bytes_total", side="receive") - value(
        decode0, "kvrelay_kv_transfer_bytes_total", side="receive"
    )
    sent = value(prefill1, "kvrelay_kv_transfer_bytes_total", side="send") - value(
        prefill0, "kvrelay_kv_transfer_bytes_total", side="send"
    )
    assert received == sent == pages * PAGE_BYTES
    assert (
        value(decode1, "kvrelay_kv_transfer_pages_total", side="receive")
        - value(decode0, "kvrelay_kv_transfer_pages_total", side="receive")
        == pages
    )
    assert (
        value(decode1, "kvrelay_kv_transfer_seconds_count", side="receive")
        - value(decode0, "kvrelay_kv_transfer_seconds_count", side="receive")
        == 1
    )
    # The first token comes from prefill; decode samples the other MAX_TOKENS - 1.
    assert (
        value(decode1, "kvrelay_decode_generated_tokens_total")
        - value(decode0, "kvrelay_decode_generated_tokens_total")
        == MAX_TOKENS - 1
    )
    assert (
        value(prefill1, "kvrelay_prefill_prompt_tokens_total")
        - value(prefill0, "kvrelay_prefill_prompt_tokens_total")
        == prompt_tokens
    )

    # The same 8 blocks again, another ending: prefill finds them in its prefix cache.
    second = complete(cluster, [*prefix, *tokens(12, 7)]).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 8 * BLOCK
    gateway2, prefill2 = scrape(gateway_url), scrape(prefill_url)
    assert (
        value(prefill2, "kvrelay_prefill_cached_tokens_total")
        - value(prefill1, "kvrelay_prefill_cached_tokens_total")
        == 8 * BLOCK
    )
    assert (
        value(gateway2, "kvrelay_prefix_cache_hit_tokens_total")
        - value(gateway0, "kvrelay_prefix_cache_hit_tokens_total")
        == 8 * BLOCK
    )
    assert 0 < value(prefill2, "kvrelay_prefix_cache_hit_rate") <= 1

    # The gateway counted both requests, their tokens and their timings.
    def grew(name: str, **labels: str) -> float:
        return value(gateway2, name, **labels) - value(gateway0, name, **labels)

    assert grew("kvrelay_requests_total", endpoint="/v1/completions", status="200") == 2
    assert grew("kvrelay_gateway_generation_tokens_total") == 2 * MAX_TOKENS
    assert (
        grew("kvrelay_gateway_prompt_tokens_total")
        == prompt_tokens + second["usage"]["prompt_tokens"]
    )
    for histogram in (
        "kvrelay_time_to_first_token_seconds",
        "kvrelay_e2e_request_latency_seconds",
        "kvrelay_time_per_output_token_seconds",
    ):
        assert grew(f"{histogram}_count") == 2, histogram
        assert grew(f"{histogram}_sum") > 0, histogram
    assert grew("kvrelay_inter_token_latency_seconds_count") >= 2
    assert value(gateway2, "kvrelay_gateway_running_requests") == 0
    assert value(gateway2, "kvrelay_gateway_worker_healthy", role="decode") == 1
    assert value(gateway2, "kvrelay_gateway_worker_healthy", role="prefill") == 1

    # Afterwards decode's pages are all free again, and prefill holds only its cache.
    deadline = time.monotonic() + 10
    while True:
        decode3, prefill3 = scrape(decode_url), scrape(prefill_url)
        decode_pages = value(decode3, "kvrelay_worker_kv_pages_used")
        prefill_busy = value(prefill3, "kvrelay_worker_kv_pages_used") - value(
            prefill3, "kvrelay_worker_kv_pages_cached"
        )
        if (decode_pages, prefill_busy) == (idle_decode_pages, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (decode_pages, prefill_busy) == (idle_decode_pages, 0)
    assert value(decode3, "kvrelay_worker_running_requests") == 0
    assert value(prefill3, "kvrelay_worker_queued_requests") == 0
    for samples in (gateway2, prefill3, decode3):
        assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert has(decode3, "kvrelay_decode_step_seconds_bucket")
    assert value(prefill3, "kvrelay_prefill_batch_size_count") >= 2


def test_kvrelay_status_shows_both_workers(cluster: Cluster, redis_server: RedisServer) -> None:
    argv = [sys.executable, "-m", "services.cli", "status", "--redis-url", redis_server.url]
    deadline = time.monotonic() + 15  # workers announce themselves within a few seconds
    while True:
        result = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60)
        rows = json.loads(result.stdout or "[]")
        if len(rows) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stdout + result.stderr
    by_role = {row["role"]: row for row in rows}
    assert set(by_role) == {"prefill", "decode"}
    assert by_role["prefill"]["address"] == cluster.prefill_addrs[0]
    assert by_role["decode"]["address"] == cluster.decode_addrs[0]
    for row in rows:
        assert row["health"] == "serving"
        assert row["kv_total_pages"] > 0 and row["memory_bytes"] > 0
        assert row["running"] == 0 and row["metrics_url"]
    assert by_role["prefill"]["last_seen_s"] < 10
    assert by_role["prefill"]["hit_rate"] is not None
    table = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert table.returncode == 0, table.stderr
    for row in rows:
        assert row["worker_id"] in table.stdout


def test_kv_receiver_counts_what_arrives_and_what_fails() -> None:
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=16, num_pages=8, page_size=BLOCK)
    receiver = LocalKvReceiver(pool, "decode-test")
    registry = worker_metrics().registry  # this process's: the receiver records into it

    def failures(reason: str) -> float:
        labels = {"side": "receive", "reason": reason}
        return registry.get_sample_value("kvrelay_kv_transfer_failures_total", labels) or 0.0

    incomplete, aborted = failures("incomplete"), failures("aborted")
    # The done message says 1 chunk came; none did.
    receiver.expect("r1", [0, 1])
    receiver.on_done(KvDone("r1", 20, 1, 5, 0.0))
    receiver.expect("r2", [2])
    receiver.on_abort(KvAbort("r2", "prefill failed"))
    receiver.on_abort(KvAbort("unknown", "not expected: not counted"))
    assert failures("incomplete") == incomplete + 1
    assert failures("aborted") == aborted + 1
