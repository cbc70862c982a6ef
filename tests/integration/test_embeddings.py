"""Embeddings: /v1/embeddings through a real cluster (tiny random model) and the official
OpenAI SDK, checked against HF transformers' hidden states pooled the same way; and the
prefill-side pooling (mean, CLS, chunked long prompts) on a real model runner.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from services.prefill import embed
from shared.model.runner import ModelRunner
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-embed"
HIDDEN = 64  # build_tiny_llama's hidden size
TEXTS = ["The sea is calm tonight.", "A lighthouse keeper", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-embed"))


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("embed-cluster"),
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="none", max_retries=0)


def hf_embedding(
    hf: PreTrainedModel, ids: list[int], mode: str = "last", norm: bool = True
) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf.model(torch.tensor([ids])).last_hidden_state[0].float()
    vector = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[mode]
    return torch.nn.functional.normalize(vector, dim=0) if norm else vector


def test_texts_embed_as_transformers_does(
    client: openai.OpenAI, hf: PreTrainedModel, model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    response = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in response.data] == [0, 1, 2]
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(map(len, ids))
    for item, prompt in zip(response.data, ids, strict=True):
        got = torch.tensor(item.embedding)
        assert got.shape == (HIDDEN,)
        torch.testing.assert_close(got, hf_embedding(hf, prompt), atol=1e-4, rtol=0)
        assert float(got.norm()) == pytest.approx(1.0, abs=1e-5)


def test_token_ids_and_one_text(client: openai.OpenAI, hf: PreTrainedModel) -> None:
    one = client.embeddings.create(model=MODEL, input=[5, 6, 7, 8], encoding_format="float")
    many = client.embeddings.create(
        model=MODEL, input=[[5, 6, 7, 8], [9, 10]], encoding_format="float"
    )
    assert len(one.data) == 1 and len(many.data) == 2 and one.usage.prompt_tokens == 4
    assert one.data[0].embedding == many.data[0].embedding
    torch.testing.assert_close(
        torch.tensor(many.data[1].embedding), hf_embedding(hf, [9, 10]), atol=1e-4, rtol=0
    )
    single = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    batch = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert single.data[0].embedding == pytest.approx(batch.data[0].embedding, abs=1e-5)


def test_base64_is_little_endian_float32(cluster: Cluster, client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    raw = httpx.post(
        f"{cluster.base_url}/v1/embeddings",
        json={"model": MODEL, "input": TEXTS, "encoding_format": "base64"},
        timeout=60,
    ).json()
    for item, expected in zip(raw["data"], floats.data, strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(expected.embedding, abs=1e-6)
    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=MODEL, input=TEXTS)
    assert default.data[2].embedding == pytest.approx(floats.data[2].embedding, abs=1e-6)


def test_embedding_frees_every_page(cluster: Cluster, client: openai.OpenAI) -> None:
    client.embeddings.create(model=MODEL, input=["word " * 300, "short"])
    cluster.wait_all_pages_free()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": [[1, 2], []]}, "input"),
        ({"input": [49152]}, "input"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": "hi", "dimensions": 8}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [1] * 3000}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(
    cluster: Cluster, fields: dict[str, Any], param: str
) -> None:
    response = httpx.post(
        f"{cluster.base_url}/v1/embeddings", json={"model": MODEL, **fields}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_dimensions_equal_to_the_model_are_fine(client: openai.OpenAI) -> None:
    response = client.embeddings.create(
        model=MODEL, input="hi", dimensions=HIDDEN, encoding_format="float"
    )
    assert len(response.data[0].embedding) == HIDDEN


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


def test_colocated_worker_embeds_too(
    model_dir: Path, hf: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("embed-colocated"),
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        colocated=True,
    )
    try:
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="none", max_retries=0)
        response = client.embeddings.create(
            model=MODEL, input=[[5, 6, 7, 8], [9, 10]], encoding_format="float"
        )
        for item, prompt in zip(response.data, [[5, 6, 7, 8], [9, 10]], strict=True):
            expected = hf_embedding(hf, prompt)
            torch.testing.assert_close(torch.tensor(item.embedding), expected, atol=1e-4, rtol=0)
        cluster.wait_all_pages_free()
    finally:
        cluster.stop()


# --- pooling on the prefill side, on a real runner ---------------------------------------


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, kv_cache_mb=8, num_threads=1)


def write_sentence_transformers_config(model_dir: Path, mode_key: str, normalize: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, mode_key: True})
    )


@pytest.mark.parametrize(
    ("mode_key", "normalize", "expected"),
    [
        ("pooling_mode_mean_tokens", False, embed.Pooling("mean", False)),
        ("pooling_mode_cls_token", True, embed.Pooling("cls", True)),
        ("pooling_mode_lasttoken", True, embed.Pooling("last", True)),
    ],
)
def test_sentence_transformers_pooling_is_read(
    tmp_path: Path, mode_key: str, normalize: bool, expected: embed.Pooling
) -> None:
    write_sentence_transformers_config(tmp_path, mode_key, normalize)
    assert embed.Pooling.for_model(tmp_path) == expected
    assert embed.Pooling.for_model(tmp_path / "nowhere") == embed.Pooling("last", True)


@pytest.mark.parametrize("pooling", [embed.Pooling("mean", False), embed.Pooling("cls", True)])
def test_runner_pooling_matches_transformers(
    runner: ModelRunner, hf: PreTrainedModel, pooling: embed.Pooling
) -> None:
    prompts = [[3, 4, 5, 6, 7], [8, 9], list(range(20, 70))]
    free = runner.pool.num_free
    # A 50-token prompt in chunks of 16 tokens: its KV carried across the chunks.
    long = embed.run_group(runner, prompts[2:], pooling, runner.pool.allocate, chunk_size=16)
    short = embed.run_group(runner, prompts[:2], pooling, runner.pool.allocate, chunk_size=16)
    assert runner.pool.num_free == free
    for got, prompt in zip(short + long, prompts, strict=True):
        expected = hf_embedding(hf, prompt, pooling.mode, pooling.normalize)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_groups_fill_the_token_budget() -> None:
    assert embed.groups([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert embed.groups([7], 6) == [[0]]
