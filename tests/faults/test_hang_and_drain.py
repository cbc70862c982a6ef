"""A worker that hangs, and a worker told to stop (SIGTERM).

Real processes, a tiny model, a real Redis. A SIGSTOPped worker keeps its connections
open and answers nothing: the gateway's health checks mark it down (its circuit opens:
no requests go to it), requests in flight on it move to another pair, and once SIGCONT
lets it answer again the gateway routes to it again.

SIGTERM drains a worker: it stops taking calls (health NOT_SERVING, new calls refused as
"draining" so the gateway routes elsewhere without giving up on the calls in flight),
leaves Redis (its endpoint, and for prefill the prefix index), lets its calls in flight
finish, then exits.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.redis_server import RedisServer
from shared.observability.endpoints import endpoint_key
from shared.prefix_index.schema import IndexKeys
from tests.cluster import Cluster, start_cluster
from tests.faults.support import (
    busy_worker,
    completion_body,
    gateway_sees_healthy,
    leaked_pages,
    long_prompt,
    metric,
    record,
    restart_and_serve,
    wait_until,
)
from tests.tiny_models import build_tiny_llama

DRAIN_S = 30.0
HEALTHY = "kvrelay_gateway_worker_healthy"


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("hang-drain")
    redis_server.client().flushall()
    redis = ["--redis-url", redis_server.url]
    cluster = start_cluster(
        build_tiny_llama(tmp_path / "tiny"),
        tmp_path / "logs",
        num_prefill=2,
        num_decode=2,
        kv_cache_mb=32,
        metrics=True,
        worker_args=["--num-threads", "1", "--drain-timeout-s", str(DRAIN_S), *redis],
        gateway_args=redis,
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def _gateway_healthy(cluster: Cluster, name: str) -> float:
    role = name.rsplit("-", 1)[0]
    return metric(f"{cluster.base_url}/metrics", HEALTHY, role=role, address=cluster.address(name))


def _complete_many(cluster: Cluster, count: int) -> list[httpx.Response]:
    def one(index: int) -> httpx.Response:
        body = completion_body(cluster, long_prompt(40 + index), 8)
        return httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_hung_prefill_is_routed_around_then_comes_back(cluster: Cluster) -> None:
    victim = "prefill-1"
    pid = cluster.process(victim).pid
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        responses = _complete_many(cluster, 6)
        served_s = time.monotonic() - stopped_at
        wait_until(lambda: _gateway_healthy(cluster, victim) == 0, 10, what="circuit open")
        detect_s = time.monotonic() - stopped_at
        # While it is down, nothing is routed to it: every request is served at once.
        started = time.monotonic()
        assert all(r.status_code == 200 for r in _complete_many(cluster, 4))
        assert time.monotonic() - started < 10
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert served_s < 20, served_s
    wait_until(lambda: _gateway_healthy(cluster, victim) == 1, 15, what="circuit closed")
    closed_s = time.monotonic() - resumed_at
    # Routed to again: its prefill count grows under load spread over both workers.
    url = cluster.metrics_urls[victim]
    before = metric(url, "kvrelay_prefill_requests_total")

    def routed_again() -> bool:
        assert all(r.status_code == 200 for r in _complete_many(cluster, 4))
        return metric(url, "kvrelay_prefill_requests_total") > before

    wait_until(routed_again, 30, interval_s=0.1, what="requests on the resumed worker")
    back_s = time.monotonic() - resumed_at
    leaked = leaked_pages(cluster)
    record(
        "prefill hung (SIGSTOP), resumed (SIGCONT)",
        "200 for all (requests on it retried elsewhere)",
        back_s,
        leaked,
        f"marked down {detect_s:.1f} s after SIGSTOP; healthy {closed_s:.1f} s after SIGCONT",
    )
    assert leaked == 0


def _redis_has_endpoint(redis_server: RedisServer, worker_id: str) -> bool:
    return bool(redis_server.client().exists(endpoint_key(worker_id)))


def _index_live(redis_server: RedisServer, worker_id: str) -> bool:
    client = redis_server.client()
    keys = IndexKeys()
    slot = client.hget(keys.slots, worker_id)
    if slot is None:
        return False
    return bool(client.exists(keys.live(int(slot)))) or bool(client.scard(keys.held(int(slot))))


def _drain(
    cluster: Cluster, redis_server: RedisServer, role: str, fault: str, max_tokens: int
) -> None:
    body = completion_body(
        cluster, long_prompt(30), max_tokens, stream=True, stream_options={"include_usage": True}
    )
    events: list[str] = []
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{cluster.base_url}/v1/completions", json=body) as response,
        ThreadPoolExecutor(1) as pool,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                break
        victim = busy_worker(cluster, "decode") if role == "decode" else "prefill-0"
        process = cluster.process(victim)
        worker_id = cluster.worker_info(cluster.address(victim), role).worker_id
        assert _redis_has_endpoint(redis_server, worker_id)
        os.kill(process.pid, signal.SIGTERM)
        termed_at = time.monotonic()
        # New requests meanwhile go to the other workers.
        during = pool.submit(_complete_many, cluster, 4)
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
        finished_s = time.monotonic() - termed_at
        others = during.result()
    slowest_s = max(r.elapsed.total_seconds() for r in others)
    assert [r.status_code for r in others] == [200] * 4, [r.text for r in others]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    assert chunks[-1]["usage"]["completion_tokens"] == max_tokens  # the whole answer
    assert process.process is not None
    assert process.process.wait(timeout=DRAIN_S) == 0
    exited_s = time.monotonic() - termed_at
    assert not _redis_has_endpoint(redis_server, worker_id)
    if role == "prefill":
        assert not _index_live(redis_server, worker_id)
    leaked = leaked_pages(cluster)
    record(
        fault,
        "200, whole stream; new requests 200 on the other workers",
        0.0,  # nothing to recover from: no request failed
        leaked,
        f"in-flight stream done {finished_s:.1f} s after SIGTERM, exit 0 after {exited_s:.1f} s,"
        f" left Redis; requests during the drain took at most {slowest_s:.1f} s",
    )
    assert leaked == 0
    restart_and_serve(cluster, victim)
    gateway_sees_healthy(cluster, victim)


def test_sigterm_drains_a_decode_worker(cluster: Cluster, redis_server: RedisServer) -> None:
    _drain(cluster, redis_server, "decode", "decode SIGTERM mid-stream (drain)", 1200)


def test_sigterm_drains_a_prefill_worker(cluster: Cluster, redis_server: RedisServer) -> None:
    # The stream's prefill is long done; the drain is about new requests and the index.
    _drain(cluster, redis_server, "prefill", "prefill SIGTERM (drain)", 200)
