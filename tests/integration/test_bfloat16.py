"""--dtype bfloat16 (this CPU has avx512_bf16): the relayed answer equals one process's."""

from __future__ import annotations

from pathlib import Path

import openai
import torch
from transformers import AutoTokenizer

from shared.model.runner import ModelRunner, SeqSlice
from tests.cluster import start_cluster
from tests.tiny_models import build_tiny_llama


def _greedy_alone(model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    runner = ModelRunner(model_dir, dtype=torch.bfloat16, kv_cache_mb=8)
    pages = runner.pool.allocate(runner.pool.pages_for(len(prompt) + max_tokens))
    tokens = list(prompt)
    logits = runner.forward([SeqSlice(tokens, 0, pages)])
    out = []
    for _ in range(max_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        logits = runner.forward([SeqSlice([token], len(tokens), pages)])
        tokens.append(token)
    return out


def test_bfloat16_relay_equals_one_process(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "tiny")
    prompt = list(range(300, 340))
    expected = _greedy_alone(model, prompt, 12)
    cluster = start_cluster(model, tmp_path / "logs", worker_args=["--dtype", "bfloat16"])
    try:
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(
            model="test-model", prompt=prompt, temperature=0, max_tokens=12,
            extra_body={"ignore_eos": True},
        )
        info = cluster.worker_info(cluster.decode_addrs[0], "decode")
        assert info.dtype == "bfloat16"
        tokenizer = AutoTokenizer.from_pretrained(model)
        assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        cluster.wait_all_pages_free()
    finally:
        cluster.stop()
