"""A decode worker dies mid-stream, or while prefill is still computing for it.

Real processes, the default model, one thread per worker, one prefill and two decode
workers. Mid-stream, tokens already reached the client: the stream must end with an error
event and [DONE], never hang. Before any output (decode dies during prefill), the request
goes to the other decode worker, and the prefill worker frees the pages it held for the
lost attempt. After each fault: every surviving pool idle, a new request served.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

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

STREAM_END_S = 10.0  # the most a client may wait for the end of a broken stream


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        default_model_dir,
        tmp_path_factory.mktemp("decode-faults"),
        num_prefill=1,
        num_decode=2,
        kv_cache_mb=256,
        metrics=True,
        worker_args=["--num-threads", "1"],
        prefill_args=["--chunked-prefill-size", "256"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def test_decode_killed_mid_stream_ends_the_stream_with_an_error(cluster: Cluster) -> None:
    body = completion_body(cluster, long_prompt(20), 400, stream=True)
    events: list[str] = []
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{cluster.base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 5:
                    break
        victim = busy_worker(cluster, "decode")
        os.kill(cluster.process(victim).pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            recovered = pool.submit(seconds_until_served, cluster, killed_at)
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
            ended_s = time.monotonic() - killed_at
            recover_s = recovered.result()
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert "error" in last, events[-3:]
    assert ended_s < STREAM_END_S, ended_s
    leaked = leaked_pages(cluster)  # the prefill worker and the other decode worker
    record(
        "decode SIGKILL mid-stream",
        f"SSE error event ({last['error']['code']}) then [DONE]",
        recover_s,
        leaked,
        f"stream ended {ended_s:.2f} s after the kill",
    )
    assert leaked == 0
    restart_and_serve(cluster, victim)


def test_decode_killed_during_prefill_retries_and_prefill_frees_its_pages(
    cluster: Cluster,
) -> None:
    body = completion_body(cluster, long_prompt(500), 8)
    prefill_url = cluster.metrics_urls["prefill-0"]
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(
            httpx.post, f"{cluster.base_url}/v1/completions", json=body, timeout=120
        )
        victim = busy_worker(cluster, "decode")  # its pages are reserved: prefill is on
        wait_until(
            lambda: metric(prefill_url, "kvrelay_worker_running_requests") > 0,
            30,
            what="prefill computing",
        )
        os.kill(cluster.process(victim).pid, signal.SIGKILL)
        killed_at = time.monotonic()
        recovered = pool.submit(seconds_until_served, cluster, killed_at)
        response = answer.result()
        answered_s = time.monotonic() - killed_at
        recover_s = recovered.result()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    leaked = leaked_pages(cluster)
    record(
        "decode SIGKILL while prefill computes for it",
        "200 (retried on the other decode worker)",
        recover_s,
        leaked,
        f"answered {answered_s:.1f} s after the kill",
    )
    assert leaked == 0
    restart_and_serve(cluster, victim)
