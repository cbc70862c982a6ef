"""A client hangs up mid-answer: the abort reaches both workers within a second.

Real processes, the default model, one thread per worker. Mid-stream, decode is the one
working: its running gauge drops and its pages come back. During prefill (a long prompt
in 128-token chunks), prefill drops the job at its next chunk boundary and decode frees
the pages it reserved. Measured from the moment the connection closes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, start_cluster
from tests.faults.support import (
    completion_body,
    leaked_pages,
    long_prompt,
    metric,
    record,
    seconds_until_served,
    wait_until,
)

ABORT_S = 1.0  # the cancel reaches each worker, and decode's pages are free, within this
STEP_S = 1.0  # prefill drops a cancelled prompt at its next step boundary: one step more
RUNNING = "kvrelay_worker_running_requests"


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        default_model_dir,
        tmp_path_factory.mktemp("client-disconnect"),
        kv_cache_mb=256,
        metrics=True,
        worker_args=["--num-threads", "1"],
        # Steps of 128 tokens (~0.5 s here): a dropped prompt stops at the next one.
        prefill_args=["--chunked-prefill-size", "128"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def _idle(cluster: Cluster, role: str) -> bool:
    """Nothing running or queued on the worker, and its pool back to idle."""
    url = cluster.metrics_urls[f"{role}-0"]
    if metric(url, RUNNING) or metric(url, "kvrelay_worker_queued_requests"):
        return False
    address = cluster.address(f"{role}-0")
    info = cluster.worker_info(address, role)
    return info.free_pages + info.cached_pages == info.num_pages


def _hang_up_and_time(cluster: Cluster, fault: str, prompt: str, *, after_tokens: int) -> None:
    body = completion_body(cluster, prompt, 400, stream=True)
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{cluster.base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        if after_tokens:
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == after_tokens:
                        break
            wait_until(
                lambda: metric(cluster.metrics_urls["decode-0"], RUNNING) > 0,
                10,
                what="decode running",
            )
        else:
            wait_until(
                lambda: metric(cluster.metrics_urls["prefill-0"], RUNNING) > 0,
                30,
                what="prefill computing",
            )
        closed_at = time.monotonic()
        closed_wall = datetime.now()
    # Leaving the block closed the connection.
    stopped: dict[str, float] = {}

    def both_idle() -> bool:
        for role in ("prefill", "decode"):
            if role not in stopped and _idle(cluster, role):
                stopped[role] = time.monotonic() - closed_at
        return len(stopped) == 2

    wait_until(both_idle, 30, interval_s=0.05, what="both workers idle")
    reached = _cancel_seen_by_prefill(cluster, closed_wall)
    recover_s = seconds_until_served(cluster, closed_at)
    leaked = leaked_pages(cluster)
    record(
        fault,
        "(client gone)",
        recover_s,
        leaked,
        f"abort: prefill idle {stopped['prefill']:.2f} s, decode idle {stopped['decode']:.2f} s"
        + (f", cancel reached prefill in {reached:.2f} s" if reached is not None else ""),
    )
    assert leaked == 0
    assert stopped["decode"] < ABORT_S, stopped
    if not after_tokens:  # prefill was computing: it heard of the cancel, then stopped
        assert reached is not None and reached < ABORT_S, reached
        assert stopped["prefill"] < ABORT_S + STEP_S, stopped


def _cancel_seen_by_prefill(cluster: Cluster, since: datetime) -> float | None:
    """Seconds from `since` to the prefill worker's log line about the cancel, if any."""
    log_path = cluster.process("prefill-0").log_path
    assert log_path is not None
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if "cancelled by the caller" in line:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return (at - since).total_seconds()
    return None


def test_client_disconnect_mid_stream_reaches_both_workers_within_a_second(
    cluster: Cluster,
) -> None:
    _hang_up_and_time(cluster, "client disconnect mid-stream", long_prompt(20), after_tokens=5)


def test_client_disconnect_during_prefill_reaches_both_workers_within_a_second(
    cluster: Cluster,
) -> None:
    _hang_up_and_time(cluster, "client disconnect during prefill", long_prompt(500), after_tokens=0)
