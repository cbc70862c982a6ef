"""`--colocated`: one process doing both roles answers exactly as the disaggregated cluster.

Prefill chunks ride in the decode engine's steps; the oracle is HF transformers' greedy
generate on the same weights, as for the disaggregated path.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cluster import Cluster, start_cluster

pytestmark = pytest.mark.default_model

QUESTIONS = [
    "What is the capital of France?",
    "List three colours of the rainbow.",
    " ".join(f"Item {i} weighs {i * 3 % 17} kilograms." for i in range(40))
    + " Which item is the heaviest?",
]


@pytest.fixture(scope="module")
def colocated(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    cluster = start_cluster(
        default_model_dir, tmp_path_factory.mktemp("colocated"),
        model_name="smol", colocated=True,
        # Small chunks, so a long prompt spans several mixed steps.
        worker_args=["--chunked-prefill-size", "64", "--max-prefill-tokens", "64"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def _hf_greedy(model_dir: Path, question: str, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def test_concurrent_answers_equal_hf(colocated: Cluster, default_model_dir: Path) -> None:
    client = openai.OpenAI(base_url=f"{colocated.base_url}/v1", api_key="x", max_retries=0)

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": question}],
            temperature=0, max_tokens=24,
        )
        return reply.choices[0].message.content or ""

    # Concurrent: the long prompt's chunks are computed while the others decode.
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    expected = [_hf_greedy(default_model_dir, q, 24) for q in QUESTIONS]
    assert answers == expected
    colocated.wait_all_pages_free()
    info = colocated.worker_info(colocated.decode_addrs[0], "prefill")
    assert info.role == "colocated" and info.kv_endpoint.startswith("local://")
