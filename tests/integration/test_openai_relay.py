"""One request through gateway → prefill → KV relay → decode, against HF transformers.

The three services run as separate processes on the default model; requests go through
the official OpenAI SDK. The oracle is HF transformers' greedy `generate` on the same
weights.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tests.cluster import Cluster

pytestmark = pytest.mark.default_model

MAX_TOKENS = 32

LONG_CONTEXT = " ".join(
    f"Station {i} of the survey recorded a temperature of {10 + i % 17} degrees and "
    f"a wind speed of {3 + i % 11} metres per second."
    for i in range(18)
)

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are a terse assistant who answers in one line."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,"},
        {"role": "user", "content": "Now write one about mountains."},
    ],
    [{"role": "user", "content": f"{LONG_CONTEXT}\n\nWhich station was the warmest?"}],
    # Shares the long context with the one before: prefill reuses its cached pages.
    [{"role": "user", "content": f"{LONG_CONTEXT}\n\nWhich station was the windiest?"}],
]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def hf_answers(default_model_dir: Path) -> list[tuple[int, str, str, int]]:
    """(prompt tokens, text, finish_reason, completion tokens) per conversation."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    eos = set(model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
    answers = []
    for messages in CONVERSATIONS:
        ids = _prompt_ids(tokenizer, messages)
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
        new = out[0, len(ids):].tolist()
        finish = "length"
        if new and new[-1] in eos:
            new, finish = new[:-1], "stop"
        answers.append(
            (len(ids), tokenizer.decode(new, skip_special_tokens=True), finish, len(new))
        )
    return answers


@pytest.fixture(scope="module")
def client(default_cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{default_cluster.base_url}/v1", api_key="EMPTY", max_retries=0)


def test_long_prompt_spans_many_pages(hf_answers: list[tuple[int, str, str, int]]) -> None:
    assert max(prompt_tokens for prompt_tokens, *_ in hf_answers) > 300


def test_greedy_chat_equals_hf_generate(
    client: openai.OpenAI, default_cluster: Cluster, hf_answers: list[tuple[int, str, str, int]]
) -> None:
    cached: list[int] = []
    for messages, (prompt_tokens, text, finish, completion_tokens) in zip(
        CONVERSATIONS, hf_answers, strict=True
    ):
        response = client.chat.completions.create(
            model=default_cluster.model_name, messages=messages,  # type: ignore[arg-type]
            temperature=0, max_tokens=MAX_TOKENS,
        )
        choice = response.choices[0]
        assert choice.message.content == text, messages
        assert choice.finish_reason == finish
        assert response.usage is not None
        assert response.usage.prompt_tokens == prompt_tokens
        assert response.usage.completion_tokens in (completion_tokens, completion_tokens + 1)
        assert response.usage.prompt_tokens_details is not None
        cached.append(response.usage.prompt_tokens_details.cached_tokens or 0)
    # The last prompt repeats the one before it but for its last line: its shared, full
    # blocks came from the prefix cache, and the answer is still HF's.
    assert cached[-1] >= 300 and cached[-1] % 16 == 0
    default_cluster.wait_all_pages_free()


def test_streamed_chat_equals_non_streamed(
    client: openai.OpenAI, default_cluster: Cluster, hf_answers: list[tuple[int, str, str, int]]
) -> None:
    for messages, (_, text, finish, _) in zip(CONVERSATIONS, hf_answers, strict=True):
        stream = client.chat.completions.create(
            model=default_cluster.model_name, messages=messages,  # type: ignore[arg-type]
            temperature=0, max_tokens=MAX_TOKENS, stream=True,
        )
        pieces: list[str] = []
        finishes = []
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        assert "".join(pieces) == text
        assert finishes == [finish]
    default_cluster.wait_all_pages_free()


def test_completions_with_token_ids_equal_hf(
    client: openai.OpenAI, default_cluster: Cluster, default_model_dir: Path,
    hf_answers: list[tuple[int, str, str, int]],
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = _prompt_ids(tokenizer, CONVERSATIONS[-1])
    response = client.completions.create(
        model=default_cluster.model_name, prompt=ids, temperature=0, max_tokens=MAX_TOKENS
    )
    assert response.choices[0].text == hf_answers[-1][1]


def test_default_model_knows_paris(client: openai.OpenAI, default_cluster: Cluster) -> None:
    response = client.chat.completions.create(
        model=default_cluster.model_name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16,
    )
    assert "Paris" in (response.choices[0].message.content or "")


def test_stop_string_cuts_the_answer(client: openai.OpenAI, default_cluster: Cluster) -> None:
    response = client.chat.completions.create(
        model=default_cluster.model_name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16, stop=["France"],
    )
    content = response.choices[0].message.content or ""
    assert "France" not in content and content
    assert response.choices[0].finish_reason == "stop"
    default_cluster.wait_all_pages_free()


def test_bad_input_gets_openai_errors(client: openai.OpenAI, default_cluster: Cluster) -> None:
    model = default_cluster.model_name
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=hello)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=hello, max_tokens=0)  # type: ignore[arg-type]
    too_long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=model, messages=too_long)  # type: ignore[arg-type]
    assert excinfo.value.status_code == 400
    body = excinfo.value.body
    assert isinstance(body, dict) and "message" in body
    default_cluster.wait_all_pages_free()


def test_client_disconnect_mid_stream_frees_pages(default_cluster: Cluster) -> None:
    body = {
        "model": default_cluster.model_name,
        "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http, http.stream(
        "POST", f"{default_cluster.base_url}/v1/chat/completions", json=body
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        content_chunks = 0
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line.replace(" ", ""):
                content_chunks += 1
                if content_chunks == 3:
                    break
    # The decode worker was mid-answer; closing the connection must give its pages back.
    default_cluster.wait_all_pages_free(timeout_s=5)


def test_one_token_answer_is_served_by_prefill_alone(
    client: openai.OpenAI, default_cluster: Cluster
) -> None:
    response = client.chat.completions.create(
        model=default_cluster.model_name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=1,
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 1
    assert response.choices[0].message.content == "The"
    default_cluster.wait_all_pages_free()
