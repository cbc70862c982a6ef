"""--dtype bfloat16 (this CPU has avx512_bf16): the relayed answer equals one process's."""

from __future__ import annotations

from pathlib import Path

import openai
import torch
from transformers import AutoTokenizer

from kernels import cpu_kernels
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


def test_default_model_relay_over_gguf_blocks_equals_one_process(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """The default model in bfloat16: prefill's matmuls use the packed weights (a 45-token
    prompt), decode's read the GGUF blocks where the CPU has AMX; relayed, the answer is the
    one process's, token for token."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    text = "Explain in two sentences why the sky is blue, and then why sunsets look red. " * 2
    prompt = tokenizer.encode(text)[:45]
    expected = _greedy_alone(default_model_dir, prompt, 16)
    cluster = start_cluster(
        default_model_dir,
        tmp_path / "logs",
        worker_args=["--dtype", "bfloat16", "--num-threads", "1"],
    )
    try:
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(
            model="test-model", prompt=prompt, temperature=0, max_tokens=16,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        cluster.wait_all_pages_free()
    finally:
        cluster.stop()
    if cpu_kernels.gguf_linear_supported():
        log = (tmp_path / "logs" / "decode-0.log").read_text()
        assert "matmuls read GGUF blocks" in log
