"""Routed experts (SGLang's return_routed_experts) through a real prefill -> decode relay.

A tiny Qwen3-MoE (layer 1 dense) is served by a gateway, a prefill worker and a decode
worker started with --enable-return-routed-experts. Each choice's `routed_experts` must be
the HF router's top-k choices, layer by layer, on the prompt and every answer token but
the last (it never runs through the model): the prompt's rows come from prefill, the
answer's from decode's steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.gateway.logprobs import TokenBytes
from services.gateway.routed_experts import decode_routed_experts
from shared.model.runner import ModelRunner
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_model

NUM_LAYERS = 3
SPARSE_LAYERS = [0, 2]  # layer 1 is dense (mlp_only_layers): -1 there
TOP_K = 2
ANSWER_TOKENS = 6
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        "qwen3_moe",
        tmp_path_factory.mktemp("moe"),
        seed=11,
        num_layers=NUM_LAYERS,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def cluster(moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        moe_dir,
        tmp_path_factory.mktemp("routed-cluster"),
        model_name="tiny-moe",
        kv_cache_mb=8,
        worker_args=["--num-threads", "1", "--enable-return-routed-experts"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@torch.inference_mode()
def hf_experts(moe_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """HF's router choices [tokens, layers, top_k], -1 in the dense layer."""
    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    out = hf(torch.tensor([token_ids]), output_router_logits=True)
    expected = torch.full((len(token_ids), NUM_LAYERS, TOP_K), -1, dtype=torch.long)
    assert len(out.router_logits) == len(SPARSE_LAYERS)
    for layer, logits in zip(SPARSE_LAYERS, out.router_logits, strict=True):
        expected[:, layer] = torch.topk(torch.softmax(logits.float(), dim=-1), TOP_K).indices
    return expected


def routed(encoded: str) -> torch.Tensor:
    return torch.from_numpy(decode_routed_experts(encoded, NUM_LAYERS, TOP_K).copy()).long()


def post(cluster: Cluster, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{cluster.base_url}{path}", json=body, timeout=TIMEOUT_S)


def test_greedy_answer_experts_are_hf_routers_choices(cluster: Cluster, moe_dir: Path) -> None:
    prompt_ids = torch.randint(3, 49152, (21,), generator=torch.Generator().manual_seed(4))
    prompt = prompt_ids.tolist()
    body = {
        "model": "tiny-moe",
        "prompt": prompt,
        "max_tokens": ANSWER_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "return_routed_experts": True,
    }
    # Twice: the second finds the prompt in prefill's prefix cache, which such a request
    # does not use (cached tokens were never routed), so it gets every prompt row again.
    answers = [post(cluster, "/v1/completions", body) for _ in range(2)]
    for response in answers:
        assert response.status_code == 200, response.text
    first, second = (r.json() for r in answers)
    assert first["choices"][0]["routed_experts"] == second["choices"][0]["routed_experts"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    # The answer's tokens are HF's greedy ones (test_model_families_relay checks it); if
    # the relay's differed, so would the rows of the answer tokens.
    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    full = list(prompt)
    with torch.inference_mode():
        for _ in range(ANSWER_TOKENS):
            full.append(int(hf(torch.tensor([full])).logits[0, -1].argmax()))
    ours = routed(first["choices"][0]["routed_experts"])
    assert ours.shape == (len(prompt) + ANSWER_TOKENS - 1, NUM_LAYERS, TOP_K)
    assert torch.equal(ours, hf_experts(moe_dir, full[:-1]))


def test_each_sampled_choice_streams_its_own_experts(cluster: Cluster, moe_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    messages = [{"role": "user", "content": "Which experts do you use?"}]
    # As the gateway renders it: the template writes the special tokens itself.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = {
        "model": "tiny-moe",
        "messages": messages,
        "n": 2,
        "max_tokens": ANSWER_TOKENS,
        "temperature": 1.0,
        "seed": 7,
        "ignore_eos": True,
        "logprobs": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_routed_experts": True,
    }
    token_bytes = TokenBytes(tokenizer)
    id_of = {token_bytes(i): i for i in range(len(tokenizer))}
    answers: dict[int, list[int]] = {0: [], 1: []}
    experts: dict[int, str] = {}
    usage: dict[str, Any] = {}
    with httpx.stream(
        "POST", f"{cluster.base_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                for item in (c.get("logprobs") or {}).get("content") or []:
                    answers[c["index"]].append(id_of[bytes(item["bytes"])])
                if "routed_experts" in c:
                    assert c["finish_reason"] == "length"  # only in a choice's last chunk
                    experts[c["index"]] = c["routed_experts"]
    assert usage["prompt_tokens"] == len(prompt)
    assert answers[0] != answers[1]  # sampled: two different answers
    for index in (0, 1):
        assert len(answers[index]) == ANSWER_TOKENS
        tokens = prompt + answers[index][:-1]
        assert torch.equal(routed(experts[index]), hf_experts(moe_dir, tokens))


def test_a_request_without_the_field_gets_none(cluster: Cluster) -> None:
    body = {"model": "tiny-moe", "prompt": [5, 6, 7], "max_tokens": 2}
    response = post(cluster, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert "routed_experts" not in response.json()["choices"][0]


def test_workers_without_the_flag_refuse_with_400(
    moe_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster = start_cluster(
        moe_dir,
        tmp_path_factory.mktemp("plain-cluster"),
        model_name="tiny-moe",
        kv_cache_mb=8,
        worker_args=["--num-threads", "1"],
    )
    try:
        for path, extra in (
            ("/v1/completions", {"prompt": [5, 6, 7]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1}),  # prefill alone
        ):
            body = {"model": "tiny-moe", "max_tokens": 3, "return_routed_experts": True, **extra}
            response = post(cluster, path, body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert "--enable-return-routed-experts" in error["message"]
            assert set(error) == {"message", "type", "param", "code"}
        ok = post(cluster, "/v1/completions", {"model": "tiny-moe", "prompt": [5], "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        cluster.stop()


def test_a_dense_model_has_no_experts_to_return(tmp_path: Path) -> None:
    dense = build_tiny_model("qwen3", tmp_path / "dense", with_tokenizer=False)
    runner = ModelRunner(dense, kv_cache_mb=1)
    assert not runner.enable_routed_experts()
    refusal = runner.routed_experts_refusal()
    assert refusal is not None and "has no routed experts" in refusal
