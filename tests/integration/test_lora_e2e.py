"""LoRA adapters through the whole system: gateway, prefill and decode as separate processes.

A tiny random Llama (with the default model's tokenizer) is served with one adapter from
--lora-paths; more are loaded and unloaded at run time over HTTP. Requests pick an
adapter with `model: "base:adapter"` or the adapter's name; the oracle of each answer is
transformers' greedy decoding on the PEFT-merged model (the base model for the base).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_model
from tests.unit.test_lora import build_lora

MODEL = "test-model"
ANSWER_TOKENS = 8
EOS = 2  # the tiny model's eos id (tests/tiny_models.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("lora-e2e"), num_layers=2)


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": build_lora(model_dir, root / "a", seed=21, std=0.2),
        "b": build_lora(
            model_dir,
            root / "b",
            seed=22,
            std=0.2,
            r=8,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        ),
        "c": build_lora(model_dir, root / "c", seed=23, std=0.2, r=2, use_rslora=True),
    }


def _start(model_dir: Path, adapters: dict[str, Path], log_dir: Path, colocated: bool) -> Cluster:
    return start_cluster(
        model_dir,
        log_dir,
        model_name=MODEL,
        kv_cache_mb=16,
        colocated=colocated,
        # As under `kvrelay up`: the adapter calls to the workers must carry the token.
        internal_token="lora-e2e-token",
        worker_args=[
            "--num-threads",
            "1",
            "--max-loras-per-batch",
            "2",
            "--lora-paths",
            f"a={adapters['a']}",
        ],
    )


@pytest.fixture(scope="module")
def cluster(
    model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    cluster = _start(model_dir, adapters, tmp_path_factory.mktemp("lora-cluster"), False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.base_url, timeout=120) as client:
        yield client


class Oracle:
    """Greedy answers of transformers, on the base model or an adapter merged into it."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        self.model_dir = model_dir
        self.adapters = adapters
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._models: dict[str | None, Any] = {}

    def _model(self, adapter: str | None) -> Any:
        if adapter not in self._models:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, self.adapters[adapter]).merge_and_unload()
            self._models[adapter] = model.eval()
        return self._models[adapter]

    @torch.inference_mode()
    def answer(self, adapter: str | None, ids: list[int]) -> str:
        model, ids, new = self._model(adapter), list(ids), []
        for _ in range(ANSWER_TOKENS):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
            ids.append(token)
        return str(self.tokenizer.decode(new, skip_special_tokens=True))


@pytest.fixture(scope="module")
def oracle(model_dir: Path, adapters: dict[str, Path]) -> Oracle:
    return Oracle(model_dir, adapters)


def prompt(seed: int, length: int = 40) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(20, 49152, (length,), generator=generator).tolist()


def complete(http: httpx.Client, model: str, ids: list[int]) -> httpx.Response:
    return http.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": ids,
            "temperature": 0,
            "max_tokens": ANSWER_TOKENS,
        },
    )


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def cached_tokens(response: httpx.Response) -> int:
    details = response.json()["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def model_ids(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in http.get("/v1/models").json()["data"]}


def test_startup_adapter_is_listed_and_answers_as_the_merged_model(
    http: httpx.Client, oracle: Oracle, adapters: dict[str, Path]
) -> None:
    cards = model_ids(http)
    assert set(cards) == {MODEL, "a"}
    assert cards["a"]["parent"] == MODEL and cards["a"]["root"] == str(adapters["a"])
    assert http.get("/v1/models/a").json()["id"] == "a"
    ids = prompt(1)
    expected = oracle.answer("a", ids)
    assert text_of(complete(http, f"{MODEL}:a", ids)) == expected
    assert text_of(complete(http, "a", ids)) == expected
    # The base model answers otherwise: the adapter is really applied.
    base = text_of(complete(http, MODEL, ids))
    assert base == oracle.answer(None, ids) != expected


def test_adapter_loaded_at_run_time_and_a_mixed_batch(
    http: httpx.Client, oracle: Oracle, adapters: dict[str, Path], cluster: Cluster
) -> None:
    response = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["b"])}
    )
    assert response.status_code == 200, response.text
    assert set(response.json()["loaded_adapters"]) == {"a", "b"}
    assert "b" in model_ids(http)
    # Base, a and b at once: the workers batch them together; each gets its own answer.
    cases = [
        (None, prompt(2)),
        ("a", prompt(3)),
        ("b", prompt(4)),
        ("b", prompt(2)),
        (None, prompt(5, 70)),
        ("a", prompt(4)),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        texts = list(
            pool.map(
                lambda case: text_of(
                    complete(http, f"{MODEL}:{case[0]}" if case[0] else MODEL, case[1])
                ),
                cases,
            )
        )
    for (adapter, ids), text in zip(cases, texts, strict=True):
        assert text == oracle.answer(adapter, ids), adapter
    cluster.wait_all_pages_free()


def test_cached_prefixes_never_cross_adapters(http: httpx.Client) -> None:
    ids = prompt(6, 50)  # three full blocks
    first = complete(http, "a", ids)
    assert cached_tokens(first) == 0
    assert cached_tokens(complete(http, MODEL, ids)) == 0
    assert cached_tokens(complete(http, "a", ids)) == 48


def test_unknown_adapters_and_bad_loads_are_client_errors(
    http: httpx.Client, adapters: dict[str, Path], tmp_path: Path
) -> None:
    for model in ("nope", f"{MODEL}:nope", "other-model:a"):
        response = complete(http, model, prompt(7))
        assert response.status_code == 404, model
        assert response.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/models/nope").status_code == 404
    bad_loads = [
        ({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "not a directory"),
        ({"lora_name": "x:y", "lora_path": str(adapters["c"])}, "invalid LoRA adapter name"),
        ({"lora_name": MODEL, "lora_path": str(adapters["c"])}, "base model"),
        ({"lora_name": "a", "lora_path": str(adapters["c"])}, "already loaded"),
        ({"lora_name": "x"}, "lora_path"),
        ({"lora_name": "x", "lora_path": str(adapters["c"]), "extra": 1}, "extra"),
    ]
    for body, message in bad_loads:
        response = http.post("/v1/load_lora_adapter", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    for raw in (b"not json", b'{"lora_name": 5, "lora_path": "/x"}', b"[]"):
        response = http.post(
            "/v1/load_lora_adapter", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, raw
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "x" not in model_ids(http)
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "lora_not_found"


def test_unloaded_adapter_is_gone_and_can_come_back(
    http: httpx.Client, oracle: Oracle, adapters: dict[str, Path]
) -> None:
    body = {"lora_name": "c", "lora_path": str(adapters["c"])}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    ids = prompt(8)
    assert text_of(complete(http, "c", ids)) == oracle.answer("c", ids)
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert response.status_code == 200, response.text
    assert "c" not in response.json()["loaded_adapters"] and "c" not in model_ids(http)
    assert complete(http, "c", ids).status_code == 404
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert text_of(complete(http, f"{MODEL}:c", ids)) == oracle.answer("c", ids)


def test_colocated_worker_serves_adapters_too(
    model_dir: Path, adapters: dict[str, Path], oracle: Oracle, tmp_path: Path
) -> None:
    colocated = _start(model_dir, adapters, tmp_path / "colocated", True)
    try:
        with httpx.Client(base_url=colocated.base_url, timeout=120) as client:
            response = client.post(
                "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["b"])}
            )
            assert response.status_code == 200, response.text
            cases = [(None, prompt(9)), ("a", prompt(10)), ("b", prompt(9))]
            with ThreadPoolExecutor(len(cases)) as pool:
                texts = list(
                    pool.map(
                        lambda case: text_of(complete(client, case[0] or MODEL, case[1])), cases
                    )
                )
            for (adapter, ids), text in zip(cases, texts, strict=True):
                assert text == oracle.answer(adapter, ids), adapter
        colocated.wait_all_pages_free()
    finally:
        colocated.stop()
