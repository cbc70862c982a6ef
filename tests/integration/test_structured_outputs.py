"""Structured outputs through a real cluster (tiny random model) and the official OpenAI SDK:
response_format json_schema / json_object, SGLang's regex and ebnf, masks on every token
(the first, sampled on prefill, included) and 400s for bad specs.

A random model writes noise: whatever comes out matching the grammar is the grammar's doing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-structured"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
# Bounded everywhere (string lengths, integer ranges, item counts): every answer can end.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
EMAIL = r"[a-z]{3,8}@(example|test)\.(com|org)"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
CLOSING_TOKENS = (109, 77, 18)  # "}", "]" and '"' in the default tokenizer


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-structured"))
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp(f"structured-{request.param}"),
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        gateway_args=["--tool-call-parser", "hermes"],
        colocated=request.param == "colocated",
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="none", max_retries=0)


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 200}
    return client.chat.completions.create(**{**body, **fields})


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def test_twenty_sampled_answers_all_validate(client: openai.OpenAI) -> None:
    answers = []
    for seed in (1, 2):
        response = chat(
            client,
            response_format=json_schema_format(PERSON),
            temperature=1.0,
            n=10,
            seed=seed,
        )
        answers += response.choices
    assert len(answers) == 20
    texts = set()
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        texts.add(choice.message.content)
    assert len(texts) > 10  # sampled, not one answer twenty times


def test_greedy_answer_validates_and_streams_the_same(client: openai.OpenAI) -> None:
    fmt = json_schema_format(PERSON)
    whole = chat(client, response_format=fmt, temperature=0).choices[0]
    jsonschema.validate(json.loads(whole.message.content), PERSON)
    chunks = list(chat(client, response_format=fmt, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    # A random model nests and writes strings without end: closing tokens made likelier.
    closing = {str(t): 12 for t in CLOSING_TOKENS}
    response = chat(
        client,
        response_format={"type": "json_object"},
        temperature=0.7,
        n=6,
        seed=3,
        logit_bias=closing,
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_regex_answers_fullmatch(client: openai.OpenAI) -> None:
    for endpoint in ("chat", "completions"):
        if endpoint == "chat":
            response = chat(client, temperature=1.0, n=8, seed=5, extra_body={"regex": EMAIL})
            texts = [c.message.content for c in response.choices]
        else:
            response = client.completions.create(
                model=MODEL,
                prompt="My email address is",
                max_tokens=40,
                n=8,
                seed=6,
                extra_body={"regex": EMAIL},
            )
            texts = [c.text for c in response.choices]
        assert all(c.finish_reason == "stop" for c in response.choices)
        for text in texts:
            assert re.fullmatch(EMAIL, text), text


def test_ebnf_answers_follow_the_grammar(client: openai.OpenAI) -> None:
    grammar = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z]{1,12}'
    response = chat(client, temperature=1.0, n=6, seed=7, extra_body={"ebnf": grammar})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        assert re.fullmatch(r"(yes|no) because [a-z]{1,12}", choice.message.content)


def test_the_first_token_is_masked_too(client: openai.OpenAI) -> None:
    # max_tokens 1: prefill's token is the whole answer, so only its mask can shape it.
    for seed in range(6):
        response = client.completions.create(
            model=MODEL,
            prompt="Pick a digit:",
            max_tokens=1,
            temperature=1.0,
            seed=seed,
            extra_body={"regex": "[0-9]{3}"},
        )
        text = response.choices[0].text
        assert text and text.isdigit(), text


def test_ignore_eos_still_ends_at_the_grammar_end(client: openai.OpenAI) -> None:
    response = chat(
        client, temperature=0, max_tokens=50, extra_body={"regex": "(ok|no)!", "ignore_eos": True}
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content in ("ok!", "no!")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": json_schema_format({"type": "nonsense"})}, "response_format"),
        (
            {"response_format": json_schema_format({"properties": {"a": {"$ref": "#/x"}}})},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"extra_body": {"regex": "(unclosed"}}, "regex"),
        ({"extra_body": {"ebnf": "root ::= missing_rule"}}, "ebnf"),
        ({"extra_body": {"regex": "a", "ebnf": 'root ::= "a"'}}, "ebnf"),
    ],
)
def test_bad_specs_are_400(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, **fields)
    error = bad.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_text_response_format_is_unconstrained(client: openai.OpenAI) -> None:
    plain = chat(client, temperature=0, max_tokens=12)
    text = chat(client, temperature=0, max_tokens=12, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


# --- tool_choice enforced by a grammar of the tool parser's format (hermes here) ----------


def check_calls(choice: Any, names: set[str]) -> list[str]:
    assert choice.finish_reason == "tool_calls", choice.message
    calls = choice.message.tool_calls
    assert calls and not choice.message.content
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return [call.function.name for call in calls]


def test_tool_choice_required_gives_calls(client: openai.OpenAI) -> None:
    # A random model would call on until max_tokens: EOS (allowed between calls) made likelier.
    response = chat(
        client,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        n=6,
        seed=9,
        logit_bias={"2": 10},
    )
    for choice in response.choices:
        check_calls(choice, {"get_weather", "get_time"})
    single = chat(
        client,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        n=4,
        seed=10,
    )
    for choice in single.choices:
        assert len(check_calls(choice, {"get_weather", "get_time"})) == 1


def test_named_tool_choice_calls_that_function_once(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    response = chat(client, tools=TOOLS, tool_choice=named, temperature=1.0, n=4, seed=12)
    for choice in response.choices:
        assert check_calls(choice, {"get_time"}) == ["get_time"]


def test_required_tool_calls_stream_as_whole(client: openai.OpenAI) -> None:
    whole = chat(client, tools=TOOLS, tool_choice="required", temperature=0).choices[0]
    names = check_calls(whole, {"get_weather", "get_time"})
    chunks = list(chat(client, tools=TOOLS, tool_choice="required", temperature=0, stream=True))
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(delta.index, ["", ""])
            entry[0] += delta.function.name or ""
            entry[1] += delta.function.arguments or ""
    assert [calls[i][0] for i in sorted(calls)] == names
    assert [calls[i][1] for i in sorted(calls)] == [
        c.function.arguments for c in whole.message.tool_calls
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_and_another_grammar_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, tools=TOOLS, tool_choice="required", extra_body={"regex": "a+"})
    assert bad.value.response.json()["error"]["param"] == "tool_choice"
