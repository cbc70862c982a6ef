"""End to end: 2 prefill workers, 1 decode worker, a gateway and a real Redis index.

A request that shares a long prefix with an earlier one goes to the prefill worker that
served the earlier one, which computes only the suffix (the usage's cached_tokens and the
gateway's /metrics say so), and the answer equals the uncached answer.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.redis_server import RedisServer
from shared.block_hash import block_hashes
from shared.prefix_index import PrefixIndexReader
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-routing"
BLOCK = 16
PREFIX_TOKENS = 32 * BLOCK


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
            ) -> Iterator[Cluster]:
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-routing"), num_layers=2)
    redis_server.client().flushdb()  # the workers and gateway use the default key prefix
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("routing-cluster"),
        model_name=MODEL,
        num_prefill=2,
        num_decode=1,
        kv_cache_mb=64,
        worker_args=["--num-threads", "1", "--redis-url", redis_server.url],
        gateway_args=["--redis-url", redis_server.url, "--router-policy", "prefix"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()
        redis_server.client().flushdb()


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49000) for _ in range(count)]


def complete(cluster: Cluster, prompt: list[int], cache_salt: str | None = None
             ) -> tuple[str, int]:
    body: dict[str, object] = {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                               "temperature": 0, "ignore_eos": True}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    response = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    cached = data["usage"]["prompt_tokens_details"]["cached_tokens"]
    return data["choices"][0]["text"], int(cached)


def cached_pages(cluster: Cluster) -> list[int]:
    return [cluster.worker_info(a, "prefill").cached_pages for a in cluster.prefill_addrs]


def gateway_counter(cluster: Cluster, name: str, **labels: str) -> float:
    text = httpx.get(f"{cluster.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_a_shared_prefix_goes_back_to_the_worker_that_computed_it(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    first_prefix, second_prefix = tokens(1, PREFIX_TOKENS), tokens(2, PREFIX_TOKENS)
    try:
        _, cached = complete(cluster, first_prefix + tokens(3, 40))
        assert cached == 0
        _, cached = complete(cluster, second_prefix + tokens(4, 40))
        assert cached == 0
        # Each prefix was computed once; the idle cluster spread them over both workers.
        holding = cached_pages(cluster)
        assert all(pages >= PREFIX_TOKENS // BLOCK for pages in holding), holding

        # Both workers announced their blocks to the index.
        infos = [cluster.worker_info(a, "prefill") for a in cluster.prefill_addrs]
        ids = [info.worker_id for info in infos]
        reader = PrefixIndexReader(redis_server.url)

        async def depths(prompt: list[int]) -> dict[str, int]:
            try:
                return await reader.lookup(block_hashes(prompt, BLOCK, model=MODEL))
            finally:
                await reader.close()

        first_depths = asyncio.run(depths(first_prefix))
        assert sorted(first_depths.values()) == [0, PREFIX_TOKENS // BLOCK], first_depths
        assert set(first_depths) == set(ids)

        routed_by_prefix = gateway_counter(cluster, "kvrelay_gateway_routed_requests_total",
                                           policy="prefix")
        hits_before = gateway_counter(cluster, "kvrelay_prefix_cache_hit_tokens_total")
        for question_seed, prefix in ((5, first_prefix), (6, second_prefix), (7, first_prefix)):
            text, cached = complete(cluster, prefix + tokens(question_seed, 40))
            # Only the 40-token suffix was computed: the worker held the whole prefix.
            assert cached == PREFIX_TOKENS, (question_seed, cached)
            uncached_text, uncached = complete(cluster, prefix + tokens(question_seed, 40),
                                               cache_salt=f"fresh-{question_seed}")
            assert uncached == 0
            assert text == uncached_text
        assert gateway_counter(cluster, "kvrelay_prefix_cache_hit_tokens_total") - hits_before \
            == 3 * PREFIX_TOKENS
        assert gateway_counter(cluster, "kvrelay_gateway_routed_requests_total",
                               policy="prefix") == routed_by_prefix + 6
        assert gateway_counter(cluster, "kvrelay_gateway_prefix_index_up") == 1
        cluster.wait_all_pages_free()
    except BaseException:
        print(cluster.logs())
        raise
