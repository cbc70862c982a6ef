"""The gateway moves a request to another pair when its worker fails before any output.

Real processes on loopback, tiny model. A SIGSTOPped decode worker is a host that stopped
answering (its connections stay open, nothing comes back): only the gateway's health check
can tell, and the requests waiting on it must be retried elsewhere, not wait for their
deadline. A SIGKILLed one refuses connections at once. The multi-host test
(test_multihost.py) does the same across network namespaces with real link cuts.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

REQUESTS = 6
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module: the tests run in order, the last one kills a worker."""
    tmp_path = tmp_path_factory.mktemp("failover")
    model = build_tiny_llama(tmp_path / "tiny")
    cluster = start_cluster(model, tmp_path / "logs", num_decode=2, kv_cache_mb=32,
                            worker_args=["--num-threads", "1"])
    try:
        yield cluster
    finally:
        cluster.stop()


def _complete(cluster: Cluster, index: int) -> httpx.Response:
    body = {"model": cluster.model_name, "prompt": [1000 + index, 2000, 3000, 4000] * 8,
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)


def _complete_all(cluster: Cluster) -> list[httpx.Response]:
    with ThreadPoolExecutor(REQUESTS) as pool:
        return list(pool.map(lambda i: _complete(cluster, i), range(REQUESTS)))


def _decode_process(cluster: Cluster, index: int) -> int:
    return next(p.pid for p in cluster.processes if p.name == f"decode-{index}")


def _gateway_log(cluster: Cluster) -> str:
    gateway = next(p for p in cluster.processes if p.name == "gateway")
    assert gateway.log_path is not None
    return gateway.log_path.read_text(errors="replace")


def test_requests_leave_a_decode_worker_that_stops_answering(cluster: Cluster) -> None:
    pid = _decode_process(cluster, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        responses = _complete_all(cluster)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [r.status_code for r in responses] == [200] * REQUESTS, [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in responses)
    # Found out by the health check within seconds, not by the 600 s request deadline.
    assert elapsed < 20, elapsed
    assert "failed before any output, retrying" in _gateway_log(cluster)
    cluster.wait_all_pages_free(timeout_s=15)
    health = httpx.get(f"{cluster.base_url}/health", timeout=10)
    deadline = time.monotonic() + 15
    while health.json()["decode"] != dict.fromkeys(cluster.decode_addrs, True):
        assert time.monotonic() < deadline, health.json()  # resumed: healthy again
        time.sleep(0.5)
        health = httpx.get(f"{cluster.base_url}/health", timeout=10)


def test_requests_leave_a_decode_worker_that_died(cluster: Cluster) -> None:
    os.kill(_decode_process(cluster, 1), signal.SIGKILL)
    responses = _complete_all(cluster)
    assert [r.status_code for r in responses] == [200] * REQUESTS, [r.text for r in responses]
    health = httpx.get(f"{cluster.base_url}/health", timeout=10).json()
    assert sorted(health["decode"].values()) == [False, True], health
