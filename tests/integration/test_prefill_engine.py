"""The prefill engine's batching, chunking and prefix reuse, relayed over real ZeroMQ."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.prefill.engine import (
    KvDestination,
    PrefillEngine,
    PrefillJob,
    PrefillLimits,
)
from shared.kv_pool import KVPool
from shared.model.runner import ModelRunner, SeqSlice
from shared.prefix_cache import PrefixCache
from shared.sampler import SamplingParams
from shared.transfer import make_receiver, make_sender
from shared.transfer.base import KvReceiver
from tests.tiny_models import build_tiny_llama

GREEDY = SamplingParams(temperature=0, max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=3,
                            with_tokenizer=False, vocab_size=512)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> ModelRunner:
    return ModelRunner(tiny_model, kv_cache_mb=16)


@pytest.fixture
def decode_side(reference: ModelRunner) -> Iterator[tuple[KVPool, KvReceiver]]:
    shape = reference.pool.kv.shape
    pool = KVPool(shape[0], shape[4], shape[5], num_pages=256, page_size=shape[3])
    receiver = make_receiver("zmq", pool, "127.0.0.1", 0, "127.0.0.1")
    try:
        yield pool, receiver
    finally:
        receiver.close()


def _engine(tiny_model: Path, limits: PrefillLimits, kv_cache_mb: int = 16) -> PrefillEngine:
    runner = ModelRunner(tiny_model, kv_cache_mb=kv_cache_mb)
    engine = PrefillEngine(runner, make_sender("zmq"), "tiny", PrefixCache(runner.pool), limits)
    engine.start()
    return engine


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _expected(reference: ModelRunner, prompt: list[int]) -> tuple[torch.Tensor, int]:
    """KV (valid positions) and greedy first token of the prompt computed in one piece."""
    pool = reference.pool
    pages = pool.allocate(pool.pages_for(len(prompt)))
    try:
        logits = reference.forward([SeqSlice(prompt, 0, pages)])
        kv = pool.kv[:, :, pages].flatten(2, 3)[:, :, : len(prompt)].clone()
    finally:
        pool.free(pages)
    return kv, int(logits[0].argmax())


def _relay(engine: PrefillEngine, decode_pool: KVPool, receiver: KvReceiver,
           prompts: list[list[int]]) -> list[tuple[torch.Tensor, int, int]]:
    """Submits all prompts at once; returns (relayed KV, first token, cached tokens) each."""
    jobs = []
    for prompt in prompts:
        request_id = uuid.uuid4().hex
        pages = decode_pool.allocate(decode_pool.pages_for(len(prompt)))
        arrival = receiver.expect(request_id, pages)
        job = PrefillJob(request_id, prompt, GREEDY, KvDestination(receiver.endpoint, pages))
        jobs.append((prompt, pages, arrival, engine.submit(job)))
    results = []
    for prompt, pages, arrival, outcome_future in jobs:
        outcome = outcome_future.result(timeout=60)
        assert arrival.result(timeout=30).first_token_ids == outcome.first_token_ids
        kv = decode_pool.kv[:, :, pages].flatten(2, 3)[:, :, : len(prompt)].clone()
        decode_pool.free(pages)
        results.append((kv, outcome.first_token_ids[0], outcome.cached_tokens))
    return results


def test_chunked_prefill_relays_the_same_kv(
    tiny_model: Path, reference: ModelRunner, decode_side: tuple[KVPool, KvReceiver]
) -> None:
    engine = _engine(tiny_model, PrefillLimits(max_prefill_tokens=64, chunked_prefill_size=48))
    try:
        prompt = _prompt(1, 301)
        ((kv, token, cached),) = _relay(engine, *decode_side, [prompt])
        expected_kv, expected_token = _expected(reference, prompt)
        assert engine.stats.steps >= 301 // 48
        assert cached == 0 and token == expected_token
        torch.testing.assert_close(kv, expected_kv, rtol=1e-5, atol=1e-5)
    finally:
        engine.stop()


def test_short_prompts_share_a_step(
    tiny_model: Path, reference: ModelRunner, decode_side: tuple[KVPool, KvReceiver]
) -> None:
    engine = _engine(tiny_model, PrefillLimits(max_prefill_tokens=1024, chunked_prefill_size=512))
    try:
        prompts = [_prompt(10 + i, 20 + 17 * i) for i in range(6)]
        results = _relay(engine, *decode_side, prompts)
        assert engine.stats.largest_batch > 1
        for prompt, (kv, token, _) in zip(prompts, results, strict=True):
            expected_kv, expected_token = _expected(reference, prompt)
            assert token == expected_token
            torch.testing.assert_close(kv, expected_kv, rtol=1e-5, atol=1e-5)
        pool = engine.runner.pool
        assert pool.num_free + engine.cache.num_idle_pages() == pool.num_pages
    finally:
        engine.stop()


def test_shared_prefix_is_computed_once(
    tiny_model: Path, reference: ModelRunner, decode_side: tuple[KVPool, KvReceiver]
) -> None:
    engine = _engine(tiny_model, PrefillLimits())
    try:
        prefix = _prompt(3, 200)
        first, second = prefix + _prompt(4, 30), prefix + _prompt(5, 25)
        _relay(engine, *decode_side, [first])
        computed_before = engine.stats.tokens_computed
        ((kv, token, cached),) = _relay(engine, *decode_side, [second])
        assert cached == 192  # the prefix's full blocks
        assert engine.stats.tokens_computed - computed_before == len(second) - 192
        expected_kv, expected_token = _expected(reference, second)
        assert token == expected_token
        torch.testing.assert_close(kv, expected_kv, rtol=1e-5, atol=1e-5)
    finally:
        engine.stop()


def test_cancelled_job_frees_its_pages(
    tiny_model: Path, decode_side: tuple[KVPool, KvReceiver]
) -> None:
    engine = _engine(tiny_model, PrefillLimits(max_prefill_tokens=16, chunked_prefill_size=16))
    decode_pool, receiver = decode_side
    try:
        prompt = _prompt(6, 1500)
        pages = decode_pool.allocate(decode_pool.pages_for(len(prompt)))
        arrival = receiver.expect("to-cancel", pages)
        future = engine.submit(
            PrefillJob("to-cancel", prompt, GREEDY, KvDestination(receiver.endpoint, pages))
        )
        engine.cancel("to-cancel")
        with pytest.raises(Exception, match="cancelled"):
            future.result(timeout=30)
        # Decode hears of the abort and fails its wait instead of timing out.
        with pytest.raises(Exception, match="aborted"):
            arrival.result(timeout=10)
        pool = engine.runner.pool
        assert pool.num_free + engine.cache.num_idle_pages() == pool.num_pages
    finally:
        engine.stop()


def test_prompt_larger_than_the_pool_is_refused(tiny_model: Path) -> None:
    engine = _engine(tiny_model, PrefillLimits(), kv_cache_mb=1)
    try:
        too_long = _prompt(7, engine.runner.pool.num_pages * 16 + 1)
        with pytest.raises(ValueError, match="KV pages"):
            engine.submit(PrefillJob("big", too_long, GREEDY, None))
    finally:
        engine.stop()
