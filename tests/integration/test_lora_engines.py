"""LoRA through the engines: prefill's prefix cache and decode's batching across adapters.

The prefill engine keys its cached blocks by adapter, so the same prompt under another
adapter is computed again (its KV differs) and its first token is that adapter's. The
decode engine runs sequences of several adapters together; with fewer slots than
adapters it takes them in turns, and every sequence still gets its own greedy answer.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import pytest

from services.decode.engine import DecodeEngine, DecodeSequence, LocalPrefill, TokenEvent
from services.prefill.engine import PrefillEngine, PrefillJob
from shared.kv_pool import KVPool
from shared.model.runner import ModelRunner
from shared.prefix_cache import PrefixCache
from shared.sampler import SamplingParams
from shared.transfer import make_sender
from tests.tiny_models import build_tiny_model
from tests.unit.test_lora import build_lora, hf_logits, prompt

VOCAB = 512
ANSWER = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        "llama",
        tmp_path_factory.mktemp("lora-engines"),
        num_layers=2,
        vocab_size=VOCAB,
        with_tokenizer=False,
    )


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": build_lora(model_dir, root / "a", seed=11),
        "b": build_lora(
            model_dir, root / "b", seed=12, r=8, target_modules=["q_proj", "up_proj"], std=0.2
        ),
    }


def _runner(model_dir: Path, adapters: dict[str, Path], slots: int) -> ModelRunner:
    runner = ModelRunner(model_dir, kv_cache_mb=8, page_size=16)
    registry = runner.enable_lora(max_loras_per_batch=slots)
    for name, path in adapters.items():
        registry.load(name, str(path))
    return runner


def hf_greedy(model_dir: Path, adapter: Path | None, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(hf_logits(model_dir, adapter, ids)[-1].argmax()))
    return ids[-steps:]


def test_cached_prefix_never_crosses_adapters(model_dir: Path, adapters: dict[str, Path]) -> None:
    runner = _runner(model_dir, adapters, slots=2)
    registry = runner.lora
    assert registry is not None
    engine = PrefillEngine(runner, make_sender("zmq"), "tiny", PrefixCache(runner.pool))
    engine.start()
    try:
        ids = prompt(20, 40)  # two full blocks of 16
        greedy = SamplingParams(temperature=0, max_new_tokens=1)
        outcomes = {}
        for label, name in [("a", "a"), ("b", "b"), ("base", None), ("a again", "a")]:
            lora = None if name is None else registry.get(name)
            job = PrefillJob(uuid.uuid4().hex, ids, greedy, None, lora=lora)
            outcomes[label] = engine.submit(job).result(timeout=60)
        assert [outcomes[k].cached_tokens for k in ("a", "b", "base", "a again")] == [0, 0, 0, 32]
        for label, name in [("a", "a"), ("b", "b"), ("base", None)]:
            expected = int(hf_logits(model_dir, adapters.get(name or ""), ids)[-1].argmax())
            assert outcomes[label].first_token_ids == [expected], label
        assert outcomes["a again"].first_token_ids == outcomes["a"].first_token_ids
        assert len({outcomes[k].first_token_ids[0] for k in ("a", "b", "base")}) > 1
    finally:
        engine.stop()


def decode_all(
    runner: ModelRunner, cases: list[tuple[list[int], str | None]], answer: int
) -> list[list[int]]:
    """Each prompt prefilled by the decode engine (colocated style), then decoded greedily
    alongside the others; returns each answer (the first token included)."""
    registry = runner.lora
    assert registry is not None
    engine = DecodeEngine(runner)
    engine.start()
    pool = runner.pool
    params = SamplingParams(temperature=0, max_new_tokens=answer)
    answers: list[list[int]] = [[] for _ in cases]
    finished = [threading.Event() for _ in cases]
    try:
        for i, (ids, name) in enumerate(cases):
            lora = None if name is None else registry.get(name)
            pages = pool.allocate(pool.pages_for(len(ids)))  # decode claims the rest
            first: list[int] = []
            prefilled = threading.Event()

            def done(
                tokens: list[int],
                _lp: list[float],
                error: str | None,
                first: list[int] = first,
                prefilled: threading.Event = prefilled,
            ) -> None:
                assert error is None, error
                first.extend(tokens)
                prefilled.set()

            engine.submit_prefill(
                LocalPrefill(uuid.uuid4().hex, ids, pages, params, done, lora=lora)
            )
            assert prefilled.wait(60)
            answers[i].append(first[0])

            def emit(event: TokenEvent, i: int = i) -> None:
                assert event.error is None, event.error
                if event.token_id is not None:
                    answers[i].append(event.token_id)
                if event.finish_reason is not None:
                    finished[i].set()

            engine.submit(
                DecodeSequence(f"r{i}", [*ids, first[0]], pages, params, 1, emit, lora=lora)
            )
        for event in finished:
            assert event.wait(60)
    finally:
        engine.stop()
    assert pool.num_free == pool.num_pages
    return answers


def test_decode_batches_adapters_in_turns_when_slots_are_fewer(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    # One slot, three kinds of sequence (base, a, b): steps alternate between adapters.
    runner = _runner(model_dir, adapters, slots=1)
    cases = [(prompt(30 + i, 19 + 5 * i), name) for i, name in enumerate([None, "a", "b", "a"])]
    answers = decode_all(runner, cases, ANSWER)
    for (ids, name), answer in zip(cases, answers, strict=True):
        assert answer == hf_greedy(model_dir, adapters.get(name or ""), ids, ANSWER), name
    assert runner.lora is not None and runner.lora.slots.installs > 2  # the slot changed hands


def test_preempted_sequences_recompute_with_their_adapter(
    model_dir: Path, adapters: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    runner = _runner(model_dir, adapters, slots=2)
    shape = runner.pool.kv.shape
    # 9 pages of 16 tokens: three 30-token prompts fit, their 24-token answers do not.
    runner.pool = KVPool(shape[0], shape[4], shape[5], num_pages=9, page_size=shape[3])
    # The newest sequences give their pages up: here those of adapters b and a.
    cases = [(prompt(40 + i, 30), name) for i, name in enumerate([None, "a", "b"])]
    with caplog.at_level(logging.INFO, logger="services.decode.engine"):
        answers = decode_all(runner, cases, 24)
    preempted = {r.getMessage().split()[1] for r in caplog.records if "preempted" in r.getMessage()}
    assert preempted & {"r1:", "r2:"}, preempted
    for (ids, name), answer in zip(cases, answers, strict=True):
        assert answer == hf_greedy(model_dir, adapters.get(name or ""), ids, 24), name
