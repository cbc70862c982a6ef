"""Logprobs through a real cluster (tiny random model) and the official OpenAI SDK: chat's
`logprobs.content[]`, completions' legacy lists, `echo`, streams that put together equal
the whole answer, and the raw logprobs against HF transformers' own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-logprobs"
ASK = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT_IDS = [1, 504, 3458, 282, 260, 6372, 30, 1217, 1838, 314]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-logprobs"))


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("logprobs-cluster"),
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


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 16}
    return client.chat.completions.create(**{**body, **fields})


Entry = tuple[str, list[int], float, list[tuple[str, float]]]


def entries(content: list[Any]) -> list[Entry]:
    return [
        (e.token, e.bytes, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
        for e in content
    ]


def test_chat_logprobs_describe_each_token(client: openai.OpenAI) -> None:
    choice = chat(client, logprobs=True, top_logprobs=5).choices[0]
    content = choice.logprobs.content
    assert choice.finish_reason == "length" and len(content) == 16
    # The token bytes put together are the answer (nothing held back, no special token).
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 5
        best = entry.top_logprobs[0]
        assert (best.token, best.bytes) == (entry.token, entry.bytes)  # greedy: the best
        assert best.logprob == pytest.approx(entry.logprob, abs=1e-6)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_chat_logprobs_without_alternatives(client: openai.OpenAI) -> None:
    plain = chat(client)
    with_logprobs = chat(client, logprobs=True)
    assert plain.choices[0].logprobs is None
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 16 and all(e.top_logprobs == [] for e in content)
    assert with_logprobs.choices[0].message.content == plain.choices[0].message.content


def test_streamed_chat_logprobs_equal_the_whole_answers(client: openai.OpenAI) -> None:
    for fields in ({}, {"stop": ["e"]}, {"n": 2, "temperature": 0.8, "seed": 11}):
        whole = chat(client, logprobs=True, top_logprobs=3, max_tokens=24, **fields)
        chunks = list(
            chat(client, logprobs=True, top_logprobs=3, max_tokens=24, stream=True, **fields)
        )
        for choice in whole.choices:
            mine = [
                c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index
            ]
            text = "".join(c.delta.content or "" for c in mine)
            assert text == choice.message.content
            streamed = [e for c in mine if c.logprobs for e in c.logprobs.content]
            expected = entries(choice.logprobs.content)
            got = entries(streamed)
            assert [(t, b) for t, b, _, _ in got] == [(t, b) for t, b, _, _ in expected]
            assert [lp for _, _, lp, _ in got] == pytest.approx(
                [lp for _, _, lp, _ in expected], abs=1e-5
            )
            for (_, _, _, top_got), (_, _, _, top_expected) in zip(got, expected, strict=True):
                assert [t for t, _ in top_got] == [t for t, _ in top_expected]
                assert [v for _, v in top_got] == pytest.approx(
                    [v for _, v in top_expected], abs=1e-5
                )


def test_completion_logprobs_match_transformers(client: openai.OpenAI, model_dir: Path) -> None:
    response = client.completions.create(
        model=MODEL, prompt=PROMPT_IDS, max_tokens=8, temperature=0, logprobs=3
    )
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert "".join(logprobs.tokens) == choice.text
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    assert logprobs.text_offset == offsets
    # HF's greedy answer, each step over the whole sequence, and its log_softmax.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(PROMPT_IDS)
    with torch.no_grad():
        for step in range(8):
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(logp.argmax())
            assert logprobs.token_logprobs[step] == pytest.approx(float(logp[token]), abs=1e-4)
            top = logprobs.top_logprobs[step]
            assert len(top) == 3  # the chosen token is one of the three best
            best = torch.topk(logp, 3).values.tolist()
            assert sorted(top.values(), reverse=True) == pytest.approx(best, abs=1e-4)
            ids.append(token)


def test_streamed_completion_logprobs_equal_the_whole_answer(client: openai.OpenAI) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": "The sea is",
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 2,
    }
    whole = client.completions.create(**body).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(**body, stream=True) if c.choices]
    parts = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    streamed = [v for p in parts for v in p.token_logprobs]
    assert streamed == pytest.approx(whole.token_logprobs, abs=1e-5)


def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": 1, "echo": True}, "echo"),
    ],
)
def test_bad_logprob_requests_are_400(
    client: openai.OpenAI, endpoint: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        if endpoint == "chat":
            chat(client, **fields)
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **fields)
    error = bad.value.response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
