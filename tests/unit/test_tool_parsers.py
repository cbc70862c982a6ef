"""Tool-call parsers: calls out of model text, whole or fed in pieces.

The pieces are what the gateway really feeds them: the text the incremental detokenizer
releases token by token (the default model's tokenizer), or, for the property tests,
any cut of the text at all. Cut any way, the text must give the same calls and content.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.gateway.chat_output import ChatStream, OutputSpec, whole_message
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.generate import Finished, GenerationEvent, TextDelta
from services.gateway.tool_parsers import default_tool_parser, make_tool_parser

TOOLS = frozenset({"get_weather", "get_time"})
Calls = list[tuple[str, str]]


def parse(
    name: str, pieces: list[str], *, max_calls: int | None = None, tools: frozenset[str] = TOOLS
) -> tuple[str, Calls]:
    """(content, [(name, arguments)]) from the pieces fed one by one, then flushed."""
    parser = make_tool_parser(name, tools, max_calls=max_calls)
    content = ""
    calls: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    for result in [*(parser.feed(p) for p in pieces), parser.flush()]:
        content += result.content
        for piece in result.calls:
            if piece.id is not None:
                assert piece.index not in calls, "a call starts once"
                assert piece.name is not None
                calls[piece.index] = [piece.name, ""]
                ids[piece.index] = piece.id
            calls[piece.index][1] += piece.arguments
    assert sorted(calls) == list(range(len(calls))), "calls are numbered 0, 1, 2..."
    assert len(set(ids.values())) == len(ids)
    return content, [(n, a) for n, a in (calls[i] for i in sorted(calls))]


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted(p % (len(text) + 1) for p in points), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_dir)


def token_pieces(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The text as the gateway sees it stream: one detokenizer release per token."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    return pieces


# --- Hermes / Qwen ----------------------------------------------------------------------

HERMES_TWO_CALLS = (
    "I will look both up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)


def test_hermes_calls_and_content(tokenizer: PreTrainedTokenizerBase) -> None:
    expected = (
        "I will look both up.",
        [
            ("get_weather", '{"city": "Paris", "days": [1, 2]}'),
            ("get_time", '{"tz": "Europe/Paris"}'),
        ],
    )
    assert parse("hermes", [HERMES_TWO_CALLS]) == expected
    pieces = token_pieces(tokenizer, HERMES_TWO_CALLS)
    assert len(pieces) > 40
    assert parse("hermes", pieces) == expected
    assert parse("qwen25", pieces) == expected


def test_hermes_streams_the_arguments_as_they_come(tokenizer: PreTrainedTokenizerBase) -> None:
    parser = make_tool_parser("hermes", TOOLS)
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    pieces = token_pieces(tokenizer, text)
    releases = [parser.feed(p) for p in pieces]
    starts = [i for i, r in enumerate(releases) for c in r.calls if c.id is not None]
    arguments = [c.arguments for r in releases for c in r.calls if c.id is None]
    assert len(starts) == 1
    # The name once complete, then the arguments over several tokens, before </tool_call>.
    assert len([a for a in arguments if a]) >= 5
    assert "".join(arguments) == '{"city": "Paris", "unit": "c"}'
    assert not any(r.content for r in releases)
    assert not parser.feed("</tool_call>")


def test_hermes_text_without_calls_is_content(tokenizer: PreTrainedTokenizerBase) -> None:
    for text in (
        "Plain answer with < and > and </tool_call> inside.\n",
        "a <tool_callx> b <tool_",
        "  leading and trailing  \n",
    ):
        assert parse("hermes", token_pieces(tokenizer, text)) == (text, [])
        assert parse("hermes", [text]) == (text, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Not JSON, or not a call: the model's text, tags and all.
        (
            '<tool_call>{"name": get_weather}</tool_call>',
            ('<tool_call>{"name": get_weather}</tool_call>', []),
        ),
        (
            '<tool_call>{"city": "Paris"}</tool_call>',
            ('<tool_call>{"city": "Paris"}</tool_call>', []),
        ),
        # A function the request did not offer.
        (
            '<tool_call>{"name": "launch", "arguments": {}}</tool_call> ok',
            ('<tool_call>{"name": "launch", "arguments": {}}</tool_call> ok', []),
        ),
        # Keys in another order, arguments as a JSON string, no arguments at all.
        (
            '<tool_call>{"arguments": {"x": 1}, "name": "get_time"}</tool_call>',
            ("", [("get_time", '{"x": 1}')]),
        ),
        (
            '<tool_call>{"name": "get_time", "arguments": "{\\"x\\": 1}"}</tool_call>',
            ("", [("get_time", '{"x": 1}')]),
        ),
        ('<tool_call>{"name": "get_time"}</tool_call>', ("", [("get_time", "{}")])),
        # Braces, quotes and escapes inside strings do not end the arguments.
        (
            '<tool_call>{"name": "get_time", "arguments": {"q": "}\\"{", "r": ["]"]}}</tool_call>',
            ("", [("get_time", '{"q": "}\\"{", "r": ["]"]}')]),
        ),
        # Cut short (max_tokens): what was released stays; an unreleased head is text.
        ('<tool_call>{"name": "get_time", "arguments": {"x": 1', ("", [("get_time", '{"x": 1')])),
        ('<tool_call>{"name": "get_ti', ('<tool_call>{"name": "get_ti', [])),
        (
            'Hi <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n\nBye\n',
            ("Hi Bye", [("get_time", "{}")]),
        ),
    ],
)
def test_hermes_edge_cases(text: str, expected: tuple[str, Calls]) -> None:
    assert parse("hermes", [text]) == expected
    assert parse("hermes", list(text)) == expected  # one character at a time


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    assert parse("hermes", [HERMES_TWO_CALLS], max_calls=1) == (
        "I will look both up.",
        [("get_weather", '{"city": "Paris", "days": [1, 2]}')],
    )


# --- Llama 3 JSON -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            ("", [("get_weather", '{"city": "Paris"}')]),
        ),
        (
            '<|python_tag|>{"name": "get_time", "parameters": {"q": "a;b"}}',
            ("", [("get_time", '{"q": "a;b"}')]),
        ),
        (
            '{"name": "get_weather", "parameters": {"city": "Rome"}}; '
            '{"name": "get_time", "arguments": {}}',
            ("", [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")]),
        ),
        ('  {"name": "get_time", "parameters": {}}\n\nDone.', ("Done.", [("get_time", "{}")])),
        ("The weather is fine.", ("The weather is fine.", [])),
        (
            'Sure: {"name": "get_time", "parameters": {}}',
            ('Sure: {"name": "get_time", "parameters": {}}', []),
        ),
        ('{"answer": 42}', ('{"answer": 42}', [])),
        ('{"name": "get_time", "parameters": {"x"', ("", [("get_time", '{"x"')])),
    ],
)
def test_llama3_json_calls(
    tokenizer: PreTrainedTokenizerBase, text: str, expected: tuple[str, Calls]
) -> None:
    assert parse("llama3", [text]) == expected
    assert parse("llama3", token_pieces(tokenizer, text)) == expected
    assert parse("llama3", list(text)) == expected


# --- any cut, same answer ---------------------------------------------------------------

FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "</tool",
    "<|python_tag|>",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ":",
    ",",
    ";",
    " ",
    "\n",
    "Hi",
    "x",
    '{"name": "get_weather", "arguments": ',
    '{"name": "get_time", "parameters": ',
    '{"name": "nope", "arguments": ',
    '"a": 1',
    '"s": "}{"',
    '{"city": "Paris"}',
    "}}",
]


@settings(max_examples=300, deadline=None)
@given(
    parser=st.sampled_from(["hermes", "llama3"]),
    text=st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    max_calls=st.sampled_from([None, 1]),
)
def test_any_cut_gives_the_same_answer(
    parser: str, text: str, points: list[int], max_calls: int | None
) -> None:
    assert parse(parser, cut(text, points), max_calls=max_calls) == parse(
        parser, [text], max_calls=max_calls
    )


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.text(alphabet=st.characters(codec="utf-8"), max_size=20).filter(
        lambda s: "<" not in s
    ),
    city=st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_valid_calls_come_out_whole(prefix: str, city: str, points: list[int]) -> None:
    arguments = json.dumps({"city": city, "n": [1, {"k": "v"}]})
    text = f'{prefix}<tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call>'
    content, calls = parse("hermes", cut(text, points))
    assert content == prefix.rstrip()
    assert calls == [("get_weather", arguments)]
    assert json.loads(calls[0][1]) == {"city": city, "n": [1, {"k": "v"}]}


# --- which parser ----------------------------------------------------------------------


def test_default_parser_from_the_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    qwen = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\\n{...}</tool_call>"
    llama = (
        '{%- if tools %}<|start_header_id|>ipython<|end_header_id|>{"name": ..., '
        '"parameters": ...}{% endif %}'
    )
    assert default_tool_parser(qwen) == "hermes"
    assert default_tool_parser(llama) == "llama3"
    assert default_tool_parser("{{ '<|python_tag|>' }}") == "llama3"
    assert default_tool_parser(tokenizer.chat_template) is None  # SmolLM2 knows no tools
    assert default_tool_parser(None) is None
    with pytest.raises(ValueError, match="unknown tool call parser"):
        make_tool_parser("mistral-ish", TOOLS)


# --- the chat answer: reasoning + calls, whole and streamed ---------------------------

SPEC = OutputSpec(reasoning_parser="qwen3", tool_parser="hermes", tool_names=TOOLS)
ANSWER = "<think>Need the weather.</think>\n\n" + HERMES_TWO_CALLS


async def _events(pieces: list[str], finish: str) -> AsyncGenerator[GenerationEvent, None]:
    for piece in pieces:
        yield TextDelta(piece)
    yield Finished(finish, prompt_tokens=3, completion_tokens=len(pieces))


def stream_chunks(spec: OutputSpec, pieces: list[str], finish: str = "stop") -> list[Any]:
    """The chunks event_stream would send: opening, one per parsed event, finish."""
    stream = ChatStream("chatcmpl-x", 0, "m", False, spec)

    async def run() -> list[dict[str, Any]]:
        chunks = list(stream.opening())
        async for event in stream.parse(_events(pieces, finish)):
            if isinstance(event, TextDelta):
                chunks.append(stream.text(event.text))
            else:
                chunks.append(stream.finish(event.finish_reason))
        return chunks

    return asyncio.run(run())


def put_together(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        if not choice["finish_reason"]:
            assert delta, "text held back (maybe part of a tag) makes no empty chunk"
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls", []):
            if "id" in call:
                calls[call["index"]] = {
                    "id": call["id"],
                    "type": call["type"],
                    "function": dict(call["function"]),
                }
            else:
                assert set(call) == {"index", "function"}
                assert set(call["function"]) == {"arguments"}
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        finish = choice["finish_reason"] or finish
    return {
        "content": content or None,
        "reasoning_content": reasoning or None,
        "tool_calls": [calls[i] for i in sorted(calls)] or None,
        "finish_reason": finish,
    }


def whole(spec: OutputSpec, text: str, finish: str = "stop") -> dict[str, Any]:
    message, choice = whole_message(spec, text)
    data = message.model_dump(mode="json")
    for call in data.get("tool_calls") or []:
        call["id"] = "call_x"
    return {
        "content": data["content"],
        "reasoning_content": data.get("reasoning_content"),
        "tool_calls": data.get("tool_calls"),
        "finish_reason": choice.finish_reason(finish),
    }


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    calls = [{**c, "id": "call_x"} for c in answer["tool_calls"] or []]
    return {**answer, "tool_calls": calls or None}


def test_streamed_chat_answer_is_the_whole_one(tokenizer: PreTrainedTokenizerBase) -> None:
    expected = whole(SPEC, ANSWER)
    assert expected["finish_reason"] == "tool_calls"
    assert expected["reasoning_content"] == "Need the weather."
    assert expected["content"] == "I will look both up."
    assert [c["function"]["name"] for c in expected["tool_calls"]] == ["get_weather", "get_time"]
    for pieces in (token_pieces(tokenizer, ANSWER), list(ANSWER), [ANSWER]):
        chunks = stream_chunks(SPEC, pieces)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert without_ids(put_together(chunks[1:])) == expected


def test_message_shapes() -> None:
    only_call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    answer = whole(SPEC, only_call)
    assert answer["content"] is None  # OpenAI's null content beside tool calls
    assert answer["reasoning_content"] is None
    # A cut answer stays "length" even with a call in it.
    assert whole(SPEC, only_call, "length")["finish_reason"] == "length"
    plain = whole_message(OutputSpec(), "Hello")[0].model_dump(mode="json")
    assert plain == {"role": "assistant", "content": "Hello"}  # no null extension keys
    assert whole_message(OutputSpec(), "")[0].content == ""
    assert whole(SPEC, "<think>all thought")["content"] is None
    # Without tools in the request, no tool parsing whatever the server's parser.
    spec = OutputSpec(tool_parser="hermes", tool_names=frozenset())
    assert whole(spec, only_call)["content"] == only_call
