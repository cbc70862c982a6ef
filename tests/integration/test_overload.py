"""Far more requests than KV pages: every request completes or is turned away with a 503
and Retry-After; none hangs, none fails otherwise, and every page comes back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.cluster import start_cluster
from tests.tiny_models import build_tiny_llama

NUM_REQUESTS = 200


async def _flood(base_url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(index: int) -> httpx.Response:
            return await client.post(f"{base_url}/v1/chat/completions", json={
                "model": "test-model", "temperature": 0, "max_tokens": 24, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Request {index}: " + "go " * 40}],
            })

        return list(await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS))))


def test_200_concurrent_requests_on_a_small_pool(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "tiny")
    cluster = start_cluster(
        model, tmp_path / "logs", kv_cache_mb=1, worker_args=["--num-threads", "1"],
        # A short wait for pages, so that some requests are turned away.
        decode_args=["--queue-timeout-s", "3", "--max-queued-requests", "64"],
    )
    try:
        started = time.monotonic()
        responses = asyncio.run(_flood(cluster.base_url))
        elapsed = time.monotonic() - started
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) > 0
        print(f"200: {statuses.count(200)}, 503: {statuses.count(503)} in {elapsed:.1f} s")
        for response in responses:
            if response.status_code == 503:
                assert response.headers["Retry-After"].isdigit()
                assert response.json()["error"]["message"]
            else:
                body = response.json()
                assert body["choices"][0]["finish_reason"] == "length"
                assert body["usage"]["completion_tokens"] == 24
        assert elapsed < 110
        cluster.wait_all_pages_free()
    finally:
        cluster.stop()
