"""Redis restarts under load: serving goes on (routing by load meanwhile), and the prefix
index comes back once the workers have re-announced what they hold.

Real processes, tiny model, a private redis-server (the suite's shared one is left alone).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from services.redis_server import RedisServer
from tests.cluster import Cluster, start_cluster
from tests.faults.support import completion_body, leaked_pages, metric, record, wait_until
from tests.tiny_models import build_tiny_llama

INDEX_UP = "kvrelay_gateway_prefix_index_up"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-restart")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("redis-restart-cluster")
    cluster = start_cluster(
        build_tiny_llama(tmp_path / "tiny"),
        tmp_path / "logs",
        num_prefill=2,
        kv_cache_mb=32,
        worker_args=["--num-threads", "1", "--redis-url", redis.url],
        gateway_args=["--redis-url", redis.url],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


class _Load:
    """Requests one after another (a shared 64-token prefix, so routing uses the index)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.statuses: list[int] = []
        self.slowest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._prefix = f"{uuid.uuid4().hex} " + "shared words of a system prompt " * 12

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                body = completion_body(self.cluster, f"{self._prefix} {uuid.uuid4().hex}", 4)
                started = time.monotonic()
                try:
                    status = http.post(
                        f"{self.cluster.base_url}/v1/completions", json=body
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                self.statuses.append(status)


def test_serving_goes_on_while_redis_restarts(cluster: Cluster, redis: RedisServer) -> None:
    gateway_metrics = f"{cluster.base_url}/metrics"
    wait_until(lambda: metric(gateway_metrics, INDEX_UP) == 1, 15, what="index up")
    with _Load(cluster) as load:
        time.sleep(2)
        before = len(load.statuses)
        redis.stop()
        wait_until(lambda: metric(gateway_metrics, INDEX_UP) == 0, 15, what="index down")
        time.sleep(2)  # serving without the index meanwhile
        during = len(load.statuses) - before
        redis.start()  # same port, empty
        started_at = time.monotonic()
        wait_until(lambda: metric(gateway_metrics, INDEX_UP) == 1, 30, what="index up again")
        # The workers re-announce: their liveness is back in the new Redis.
        wait_until(
            lambda: len(list(redis.client().scan_iter(match="kvr:live:*"))) == 2,
            30,
            what="both prefill workers back in the index",
        )
        recover_s = time.monotonic() - started_at
        time.sleep(1)
    assert during > 0, "no request was served while Redis was down"
    assert set(load.statuses) == {200}, sorted(set(load.statuses))
    leaked = leaked_pages(cluster)
    record(
        "Redis restart under load",
        f"200 for all {len(load.statuses)} requests",
        recover_s,
        leaked,
        f"{during} served while Redis was down; slowest {load.slowest_s:.2f} s; "
        "time to recover = Redis back -> index up with both workers",
    )
    assert leaked == 0
