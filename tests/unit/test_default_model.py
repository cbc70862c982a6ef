"""The real default model (SmolLM2-135M-Instruct from its GGUF) through our runtime.

Uses $KVRELAY_CACHE_DIR as set by the environment, so the one-time conversion is shared
between test runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from shared.model.loader import default_model_gguf, resolve_model_dir
from shared.model.runner import ModelRunner, SeqSlice

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(None)  # converts on the first run only


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, kv_cache_mb=32)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def chat_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return list(tokenizer.encode(text, add_special_tokens=False))


def greedy(runner: ModelRunner, ids: list[int], max_new: int) -> list[int]:
    eos = set(runner.config.eos_token_ids)
    pages = runner.pool.allocate(runner.pool.pages_for(len(ids) + max_new))
    try:
        out = [int(runner.forward([SeqSlice(ids, 0, pages)]).argmax())]
        while len(out) < max_new and out[-1] not in eos:
            step = SeqSlice([out[-1]], len(ids) + len(out) - 1, pages)
            out.append(int(runner.forward([step]).argmax()))
        return out
    finally:
        runner.pool.free(pages)


def test_conversion_is_cached(model_dir: Path) -> None:
    t0 = time.monotonic()
    again = resolve_model_dir(None)
    assert time.monotonic() - t0 < 1.0
    assert again == model_dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    # The same GGUF named explicitly, or via its directory, maps to the same conversion.
    gguf = default_model_gguf()
    assert resolve_model_dir(str(gguf)) == model_dir
    assert resolve_model_dir(str(gguf.parent)) == model_dir


def test_config(runner: ModelRunner) -> None:
    cfg = runner.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.head_dim, cfg.vocab_size, cfg.rope_theta) == (64, 49152, 100000.0)
    assert cfg.tie_word_embeddings and 2 in cfg.eos_token_ids


def test_capital_of_france(runner: ModelRunner, tokenizer: PreTrainedTokenizerBase) -> None:
    out = greedy(runner, chat_ids(tokenizer, "What is the capital of France?"), 32)
    text = tokenizer.decode(out)
    assert "Paris" in text, text


@pytest.mark.parametrize(
    "question",
    ["Write a haiku about the sea.", "List three uses of a paperclip."],
)
def test_greedy_matches_hf(
    runner: ModelRunner, tokenizer: PreTrainedTokenizerBase, hf_model: Any, question: str
) -> None:
    ids = chat_ids(tokenizer, question)
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
        )
    assert greedy(runner, ids, 32) == ref[0, len(ids) :].tolist()
