"""A decode pool too small for every answer at once: the newest sequences give their pages
up, recompute their KV later and finish with the same answer; nothing is lost or leaked."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

NUM_REQUESTS = 20
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def small_pool_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=4)
    # 1 MiB of KV is 64 pages of 16 tokens for this model: about 1k tokens, half of what
    # the 20 answers below need together.
    cluster = start_cluster(model, tmp_path_factory.mktemp("logs"), kv_cache_mb=1,
                            worker_args=["--num-threads", "1"])
    try:
        yield cluster
    finally:
        cluster.stop()


def _ask(client: openai.OpenAI, index: int) -> str:
    reply = client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": f"Question number {index}: say something."}],
        temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    return reply.choices[0].message.content or ""


def test_preempted_sequences_finish_with_their_own_answers(small_pool_cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{small_pool_cluster.base_url}/v1", api_key="x",
                           max_retries=0, timeout=120)
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        together = list(pool.map(lambda i: _ask(client, i), range(NUM_REQUESTS)))
    decode_log = small_pool_cluster.log_dir / "decode-0.log"
    assert "preempted" in decode_log.read_text(), small_pool_cluster.logs()
    small_pool_cluster.wait_all_pages_free()
    alone = [_ask(client, i) for i in range(NUM_REQUESTS)]
    assert together == alone
    small_pool_cluster.wait_all_pages_free()
