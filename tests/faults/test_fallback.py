"""--fallback-url: when no prefill/decode pair can serve, another OpenAI-compatible server
does (the scripted one of tests/scripted_openai_server.py here), streams included.

Real processes, tiny model. The fallback is used only when nothing reached the client
yet: with no healthy pair, or once every attempt on a pair failed before any output.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from services.processes import ChildProcess, free_port, http_healthy
from tests.cluster import Cluster, start_cluster
from tests.faults.support import (
    completion_body,
    gateway_sees_healthy,
    leaked_pages,
    record,
    restart_and_serve,
    wait_until,
)
from tests.tiny_models import build_tiny_llama

HEADER = "x-kvrelay-fallback"


@pytest.fixture(scope="module")
def fallback_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = ChildProcess(
        "scripted",
        [sys.executable, "-m", "tests.scripted_openai_server", "--port", str(port)],
        log_path=tmp_path_factory.mktemp("scripted") / "scripted.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(lambda: http_healthy(f"{url}/health"), timeout_s=30)
        yield f"{url}/v1"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fallback_url: str) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("fallback")
    cluster = start_cluster(
        build_tiny_llama(tmp_path / "tiny"),
        tmp_path / "logs",
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        gateway_args=["--fallback-url", fallback_url, "--fallback-model", "scripted"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def _post(cluster: Cluster, stream: bool) -> httpx.Response:
    body = completion_body(cluster, "itl_ms=5,5 hello", 3, stream=stream)
    return httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)


def _sse(response: httpx.Response) -> list[str]:
    return [ln[6:] for ln in response.text.splitlines() if ln.startswith("data: ")]


def test_a_healthy_pair_serves_without_the_fallback(cluster: Cluster) -> None:
    for stream in (False, True):
        response = _post(cluster, stream)
        assert response.status_code == 200, response.text
        assert HEADER not in response.headers


def test_no_healthy_pair_sends_requests_to_the_fallback(cluster: Cluster) -> None:
    pid = cluster.process("prefill-0").pid
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_until(
            lambda: (
                not httpx.get(f"{cluster.base_url}/health", timeout=10).json()["prefill"][
                    cluster.prefill_addrs[0]
                ]
            ),
            15,
            what="prefill marked down",
        )
        whole = _post(cluster, stream=False)
        streamed = _post(cluster, stream=True)
        served_s = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGCONT)
    for response in (whole, streamed):
        assert response.status_code == 200, response.text
        assert response.headers[HEADER] == "1"
    events = _sse(streamed)
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]]
    assert "".join(texts).split() == ["tok0", "tok1", "tok2"]
    gateway_sees_healthy(cluster, "prefill-0")
    back = _post(cluster, stream=False)
    assert back.status_code == 200 and HEADER not in back.headers
    leaked = leaked_pages(cluster)
    record(
        "no healthy pair (prefill hung), --fallback-url set",
        "200 from the fallback (stream and whole)",
        served_s,
        leaked,
        "served by the pair again once it answered its health check",
    )
    assert leaked == 0


def test_failures_before_any_output_go_to_the_fallback(cluster: Cluster) -> None:
    # Killed, and asked at once: the gateway's health checks have not noticed yet, so
    # the request tries the dead worker, fails before any output, and falls back.
    os.kill(cluster.process("decode-0").pid, signal.SIGKILL)
    killed_at = time.monotonic()
    response = _post(cluster, stream=True)
    served_s = time.monotonic() - killed_at
    assert response.status_code == 200, response.text
    assert response.headers[HEADER] == "1"
    assert _sse(response)[-1] == "[DONE]"
    leaked = leaked_pages(cluster)
    record(
        "decode SIGKILL, only one decode worker, --fallback-url set",
        "200, SSE stream from the fallback",
        served_s,
        leaked,
    )
    assert leaked == 0
    restart_and_serve(cluster, "decode-0")
    assert HEADER not in _post(cluster, stream=False).headers
