"""A prefill worker dies before or during the KV transfer of a request.

Real processes, the default model, one thread per worker, a long prompt cut into
256-token chunks: each chunk's KV leaves for decode as soon as it is computed, so
"before the transfer" (the worker holds the prompt, has sent nothing) and "during it"
(some chunks sent, more to come) are both wide windows, seen on the worker's /metrics.

Nothing reached the client yet when prefill dies (the first token comes from prefill),
so the gateway retries on the other prefill worker; decode frees the pages it reserved
for the lost attempt. After each fault: every surviving pool idle, a new request served.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.redis_server import RedisServer
from shared.prefix_index.schema import IndexKeys
from tests.cluster import Cluster, start_cluster
from tests.faults.support import (
    busy_worker,
    completion_body,
    leaked_pages,
    long_prompt,
    metric,
    record,
    restart_and_serve,
    seconds_until_served,
    wait_until,
)

DRAIN_S = 60.0
PROMPT_WORDS = 500  # about 1500 tokens: six chunks
SENT = "kvrelay_kv_transfer_bytes_total"


@pytest.fixture(scope="module")
def cluster(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Cluster]:
    redis_server.client().flushall()
    redis = ["--redis-url", redis_server.url]
    cluster = start_cluster(
        default_model_dir,
        tmp_path_factory.mktemp("prefill-faults"),
        num_prefill=2,
        num_decode=1,
        kv_cache_mb=256,
        metrics=True,
        worker_args=["--num-threads", "1", *redis],
        prefill_args=["--chunked-prefill-size", "256", "--drain-timeout-s", str(DRAIN_S)],
        gateway_args=redis,
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def _sent(cluster: Cluster, name: str) -> float:
    return metric(cluster.metrics_urls[name], SENT, side="send")


def _kill_prefill_and_check(cluster: Cluster, fault: str, *, during: bool, stream: bool) -> None:
    body = completion_body(cluster, long_prompt(PROMPT_WORDS), 8, stream=stream)
    sent_before = {n: _sent(cluster, n) for n in cluster.metrics_urls if n.startswith("prefill")}
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(
            httpx.post, f"{cluster.base_url}/v1/completions", json=body, timeout=120
        )
        victim = busy_worker(cluster, "prefill")
        if during:
            wait_until(
                lambda: _sent(cluster, victim) > sent_before[victim],
                30,
                what="the first KV chunk sent",
            )
        else:
            assert _sent(cluster, victim) == sent_before[victim], "KV already on its way"
        os.kill(cluster.process(victim).pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # A new request meanwhile: served by the surviving pair.
        recovered = pool.submit(seconds_until_served, cluster, killed_at)
        response = answer.result()
        answered_s = time.monotonic() - killed_at
        recover_s = recovered.result()
    assert response.status_code == 200, response.text
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        saw = "200, a whole SSE stream (retried on the other pair)"
    else:
        assert response.json()["usage"]["completion_tokens"] == 8
        saw = "200 (retried on the other pair)"
    leaked = leaked_pages(cluster)
    record(fault, saw, recover_s, leaked, f"answered {answered_s:.1f} s after the kill")
    assert leaked == 0
    gateway_log = cluster.process("gateway").log_path
    assert gateway_log is not None
    assert "failed before any output, retrying" in gateway_log.read_text(errors="replace")
    restart_and_serve(cluster, victim)


def test_prefill_killed_before_kv_transfer_retries_and_decode_frees_pages(
    cluster: Cluster,
) -> None:
    _kill_prefill_and_check(
        cluster, "prefill SIGKILL before the KV transfer", during=False, stream=False
    )


def test_prefill_killed_during_kv_transfer_retries_and_decode_frees_pages(
    cluster: Cluster,
) -> None:
    _kill_prefill_and_check(
        cluster, "prefill SIGKILL during the KV transfer", during=True, stream=True
    )


def _in_index(redis_server: RedisServer, worker_id: str) -> bool:
    client = redis_server.client()
    keys = IndexKeys()
    slot = client.hget(keys.slots, worker_id)
    return slot is not None and bool(client.exists(keys.live(int(slot))))


def test_prefill_sigterm_mid_prefill_finishes_it_and_leaves_the_index(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    body = completion_body(cluster, long_prompt(PROMPT_WORDS), 8)
    request_id = f"drain-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(
            httpx.post,
            f"{cluster.base_url}/v1/completions",
            json=body,
            headers={"X-Request-Id": request_id},
            timeout=120,
        )
        victim = busy_worker(cluster, "prefill")
        process = cluster.process(victim)
        worker_id = cluster.worker_info(cluster.address(victim), "prefill").worker_id
        assert _in_index(redis_server, worker_id)
        os.kill(process.pid, signal.SIGTERM)
        termed_at = time.monotonic()
        # Out of the index and refusing new calls at once, while it finishes the prompt.
        wait_until(lambda: not _in_index(redis_server, worker_id), 5, what="left the index")
        left_s = time.monotonic() - termed_at
        during = [pool.submit(seconds_until_served, cluster, time.monotonic()) for _ in range(3)]
        response = answer.result()
        finished_s = time.monotonic() - termed_at
        slowest_s = max(f.result() for f in during)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    assert process.process is not None
    assert process.process.wait(timeout=DRAIN_S) == 0
    exited_s = time.monotonic() - termed_at
    gateway_log = cluster.process("gateway").log_path
    assert gateway_log is not None
    # The request in flight was not retried: it finished where it was.
    lines = [ln for ln in gateway_log.read_text(errors="replace").splitlines() if request_id in ln]
    assert lines and not any("retrying" in ln for ln in lines), lines
    leaked = leaked_pages(cluster)
    record(
        "prefill SIGTERM mid-prefill (drain)",
        "200 (the prompt finished on the draining worker)",
        0.0,  # nothing to recover from: no request failed
        leaked,
        f"left the index {left_s:.2f} s after SIGTERM, prompt done {finished_s:.1f} s, exit 0 "
        f"after {exited_s:.1f} s; new requests meanwhile took at most {slowest_s:.1f} s",
    )
    assert leaked == 0
    restart_and_serve(cluster, victim)
