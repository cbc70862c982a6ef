"""Our Llama forward (paged KV) against transformers' reference on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.model.loader import resolve_model_dir
from shared.model.registry import load_model
from shared.model.runner import ModelRunner, SeqSlice
from tests.tiny_models import build_tiny_llama

ATOL = 1e-4
PAGE = 8


@pytest.fixture(scope="session", params=["tied", "untied"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tied = request.param == "tied"
    return build_tiny_llama(
        tmp_path_factory.mktemp(f"tiny-{request.param}"),
        seed=1 if tied else 2,
        tie_word_embeddings=tied,
        with_tokenizer=False,
    )


@pytest.fixture(scope="session")
def hf_model(tiny_dir: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture()
def runner(tiny_dir: Path) -> ModelRunner:
    return ModelRunner(tiny_dir, kv_cache_mb=1, page_size=PAGE)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scattered_pages(runner: ModelRunner, num_tokens: int) -> list[int]:
    # Reversed so consecutive positions never sit in consecutive pages.
    return runner.pool.allocate(runner.pool.pages_for(num_tokens))[::-1]


@torch.inference_mode()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    """HF logits at every position of `ids`, [len(ids), vocab]."""
    return hf(torch.tensor([ids])).logits[0].float()


def test_untied_checkpoint_has_its_own_head(tiny_dir: Path) -> None:
    tied = json.loads((tiny_dir / "config.json").read_text())["tie_word_embeddings"]
    model = load_model(tiny_dir, torch.float32)
    assert (model.lm_head.weight is model.embed) == tied  # type: ignore[attr-defined]


def test_prefill_matches_hf(runner: ModelRunner, hf_model: Any) -> None:
    ids = prompt(37)
    logits = runner.forward([SeqSlice(ids, 0, scattered_pages(runner, len(ids)))])
    assert logits.shape == (1, 49152) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], hf_logits(hf_model, ids)[-1], atol=ATOL, rtol=0)


def test_incremental_decode_matches_hf(runner: ModelRunner, hf_model: Any) -> None:
    ids = prompt(29, seed=1)
    n_prompt = 11
    ref = hf_logits(hf_model, ids)
    pages = scattered_pages(runner, len(ids))
    got = [runner.forward([SeqSlice(ids[:n_prompt], 0, pages)])[0]]
    for pos in range(n_prompt, len(ids)):  # teacher-forced single-token steps
        got.append(runner.forward([SeqSlice([ids[pos]], pos, pages)])[0])
    torch.testing.assert_close(torch.stack(got), ref[n_prompt - 1 :], atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf(runner: ModelRunner, hf_model: Any) -> None:
    ids = prompt(13, seed=2)
    eos = set(runner.config.eos_token_ids)
    pages = scattered_pages(runner, len(ids) + 20)
    out = [int(runner.forward([SeqSlice(ids, 0, pages)]).argmax())]
    while len(out) < 20 and out[-1] not in eos:
        step = SeqSlice([out[-1]], len(ids) + len(out) - 1, pages)
        out.append(int(runner.forward([step]).argmax()))
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
        )
    assert out == ref[0, len(ids) :].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_prefill_matches_hf(tiny_dir: Path, dtype: torch.dtype) -> None:
    # Same op order as HF in low precision too (observed bit-identical); the tolerance only
    # leaves room for kernel differences across CPUs.
    runner = ModelRunner(tiny_dir, dtype=dtype, kv_cache_mb=1, page_size=PAGE)
    assert runner.pool.kv.dtype == dtype
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype).eval()
    ids = prompt(23, seed=4)
    logits = runner.forward([SeqSlice(ids, 0, scattered_pages(runner, len(ids)))])
    torch.testing.assert_close(logits[0], hf_logits(hf, ids)[-1], atol=2e-2, rtol=0)


# float32 matmuls may sum in another order when a batch has more rows (MKL picks its kernel
# by shape), which moves logits of magnitude ~5 by ~1e-5; a batching bug moves them by >0.1.
BATCH_ATOL = 1e-4


def test_batch_equals_each_alone(runner: ModelRunner) -> None:
    seqs = [prompt(n, seed=10 + n) for n in (5, 17, 9)]
    pages = [scattered_pages(runner, len(s) + 2) for s in seqs]
    batch = runner.forward([SeqSlice(s, 0, p) for s, p in zip(seqs, pages, strict=True)])
    alone = [runner.forward([SeqSlice(s, 0, p)])[0] for s, p in zip(seqs, pages, strict=True)]
    torch.testing.assert_close(batch, torch.stack(alone), atol=BATCH_ATOL, rtol=0)

    # A mixed step: one sequence decodes while another continues its prefill in a chunk.
    nxt = [7, 8, 9]
    mixed = runner.forward(
        [SeqSlice([nxt[0]], len(seqs[0]), pages[0]), SeqSlice(seqs[1][12:], 12, pages[1])]
    )
    dec_alone = runner.forward([SeqSlice([nxt[0]], len(seqs[0]), pages[0])])[0]
    torch.testing.assert_close(mixed[0], dec_alone, atol=BATCH_ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], alone[1], atol=BATCH_ATOL, rtol=0)

    # A pure decode step for all three (the batched single-token attention path).
    # seqs[0] already holds nxt[0] at position len(seqs[0]) from the mixed step.
    positions = [len(seqs[0]) + 1, len(seqs[1]), len(seqs[2])]
    steps = [SeqSlice([t], n, p) for t, n, p in zip(nxt, positions, pages, strict=True)]
    batch = runner.forward(steps)
    alone = [runner.forward([st])[0] for st in steps]
    torch.testing.assert_close(batch, torch.stack(alone), atol=BATCH_ATOL, rtol=0)


def test_pool_pages_hold_hf_kv(runner: ModelRunner, hf_model: Any) -> None:
    ids = prompt(21, seed=3)
    pages = scattered_pages(runner, len(ids))
    runner.forward([SeqSlice(ids[:15], 0, pages)])
    runner.forward([SeqSlice(ids[15:], 15, pages)])
    with torch.inference_mode():
        out = hf_model(torch.tensor([ids]), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    kv = runner.pool.kv
    idx = torch.tensor(pages)
    for layer in range(runner.config.num_layers):
        for which, hf_t in ((0, cache.layers[layer].keys), (1, cache.layers[layer].values)):
            ours = kv[layer, which].index_select(0, idx).flatten(0, 1)[: len(ids)]
            # HF: [batch, kv_heads, tokens, head_dim]; ours: [tokens, kv_heads, head_dim].
            torch.testing.assert_close(ours, hf_t[0].transpose(0, 1), atol=ATOL, rtol=0)


def test_runner_validates_pages(runner: ModelRunner) -> None:
    pages = runner.pool.allocate(1)
    with pytest.raises(ValueError, match="cannot hold"):
        runner.forward([SeqSlice(prompt(PAGE + 1), 0, pages)])
    with pytest.raises(ValueError):
        runner.forward([SeqSlice([], 0, pages)])
    with pytest.raises(ValueError):
        runner.forward([SeqSlice([1], 0, [runner.pool.num_pages])])


def test_unknown_architecture_is_rejected(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        load_model(tmp_path, torch.float32)


def test_resolve_hf_dir_is_identity(tiny_dir: Path) -> None:
    assert resolve_model_dir(str(tiny_dir)) == tiny_dir.resolve()
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tiny_dir / "missing"))
