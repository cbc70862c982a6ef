"""Reasoning parsers: <think> blocks out of model text, whole or fed in pieces."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.reasoning import make_reasoning_parser


def split(name: str, pieces: list[str], *, opens: bool = False) -> tuple[str, str]:
    """(reasoning, content) from the pieces fed one by one, then flushed."""
    parser = make_reasoning_parser(name, prompt_opens_thinking=opens)
    reasoning = content = ""
    for part in [*(parser.feed(p) for p in pieces), parser.flush()]:
        reasoning += part.reasoning
        content += part.content
    return reasoning, content


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_dir)


def token_pieces(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [*pieces, detok.flush()]


THOUGHT = "<think>\nThe user asks for 2+2. That is 4.\n</think>\n\nIt is 4."


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("deepseek-r1", THOUGHT, ("The user asks for 2+2. That is 4.\n", "It is 4.")),
        ("qwen3", THOUGHT, ("The user asks for 2+2. That is 4.\n", "It is 4.")),
        # R1's template opens <think> in the prompt: the answer starts inside it.
        ("deepseek-r1", "Hmm, 4.</think>It is 4.", ("Hmm, 4.", "It is 4.")),
        ("deepseek-r1", "Still thinking when cut", ("Still thinking when cut", "")),
        # Qwen3 reasons only when it opens the block (enable_thinking: false: it does not).
        ("qwen3", "It is 4.", ("", "It is 4.")),
        ("qwen3", "Hmm.</think>It is 4.", ("", "Hmm.</think>It is 4.")),
        ("qwen3", "<think>cut short", ("cut short", "")),
        ("qwen3", "<thi", ("", "<thi")),
        ("qwen3", "a <think> b", ("", "a <think> b")),
        ("deepseek-r1", "<think></think>", ("", "")),
        ("qwen3", "", ("", "")),
    ],
)
def test_reasoning_split(
    tokenizer: PreTrainedTokenizerBase, name: str, text: str, expected: tuple[str, str]
) -> None:
    assert split(name, [text]) == expected
    assert split(name, list(text)) == expected
    assert split(name, token_pieces(tokenizer, text)) == expected


def test_prompt_that_opens_thinking() -> None:
    # Qwen3 thinking templates end the prompt with <think>: the answer is reasoning first.
    assert split("qwen3", ["Hmm.</think>It is 4."], opens=True) == ("Hmm.", "It is 4.")


def test_reasoning_streams_before_the_end_tag(tokenizer: PreTrainedTokenizerBase) -> None:
    parser = make_reasoning_parser("deepseek-r1")
    released = [parser.feed(p).reasoning for p in token_pieces(tokenizer, THOUGHT[:40])]
    assert len([r for r in released if r]) > 5  # token by token, not at the end


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        make_reasoning_parser("o1")


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["deepseek-r1", "qwen3"]),
    text=st.lists(
        st.sampled_from(["<think>", "</think>", "<thi", "</th", "<", ">", " ", "\n", "a", "b."]),
        max_size=20,
    ).map("".join),
    points=st.lists(st.integers(min_value=0, max_value=1000), max_size=10),
)
def test_any_cut_gives_the_same_split(name: str, text: str, points: list[int]) -> None:
    bounds = [0, *sorted(p % (len(text) + 1) for p in points), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert split(name, pieces) == split(name, [text])
