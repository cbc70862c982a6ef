"""Incremental detokenization and stop strings, with the real tokenizer of the default model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.gateway.detokenizer import IncrementalDetokenizer, OutputText, StopStringFilter


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_dir)


TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "  leading spaces,  double  spaces\n\nand blank lines\tand tabs ",
    "def f(x):\n    return x ** 2  # squares\n",
    "Café, naïve, façade, Ångström, Øresund, señor.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 end",
    "中文测试。你好世界。日本語のテキスト、한국어 텍스트.",
    "Mixed: αβγ δ — “quotes” … ∑∫√ ½ ¾ €100",
]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _stream(tokenizer: PreTrainedTokenizerBase, ids: list[int], chunks: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas: list[str] = []
    pos = 0
    for size in chunks:
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.add(ids[pos:]))
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = _encode(tokenizer, text)
    deltas = _stream(tokenizer, ids, [1] * len(ids))
    expected = _decode(tokenizer, ids)
    assert "".join(deltas) == expected
    assert expected == text  # the test texts round-trip, so this is "normal text"


@pytest.mark.parametrize("text", TEXTS)
def test_random_chunks_match_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = _encode(tokenizer, text)
    rng = random.Random(len(text))
    for _ in range(5):
        chunks = [rng.randint(1, 4) for _ in range(len(ids))]
        deltas = _stream(tokenizer, ids, chunks)
        assert "".join(deltas) == _decode(tokenizer, ids)


@pytest.mark.parametrize("text", TEXTS[3:])
def test_multibyte_characters_are_never_split(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    ids = _encode(tokenizer, text)
    # Byte-level BPE spreads these characters over several tokens: make sure that happens.
    assert any(_decode(tokenizer, [i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(tokenizer)
    shown = ""
    for tok in ids:
        delta = detok.add([tok])
        assert "\ufffd" not in delta
        shown += delta
        # Everything shown so far is whole characters of the final text.
        assert text.startswith(shown)
    shown += detok.flush()
    assert shown == text


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    ids = [*_encode(tokenizer, "Hi there"), eos, *_encode(tokenizer, " and more")]
    deltas = _stream(tokenizer, ids, [1] * len(ids))
    assert "".join(deltas) == _decode(tokenizer, ids)
    assert "<|" not in "".join(deltas)


def test_trailing_partial_character_is_flushed_at_the_end(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = _encode(tokenizer, "ok 😀")
    cut = ids[:-1]  # the emoji's last byte never comes
    detok = IncrementalDetokenizer(tokenizer)
    held = "".join(detok.add([t]) for t in cut)
    assert "\ufffd" not in held
    assert held + detok.flush() == _decode(tokenizer, cut)


def _run_output(
    tokenizer: PreTrainedTokenizerBase, text: str, stop: list[str]
) -> tuple[list[str], OutputText]:
    out = OutputText(tokenizer, stop)
    deltas = []
    for tok in _encode(tokenizer, text):
        deltas.append(out.add([tok]))
        if out.stopped:
            break
    if not out.stopped:
        deltas.append(out.finish())
    return deltas, out


def _assert_never_leaks(deltas: list[str], expected: str) -> None:
    shown = ""
    for delta in deltas:
        shown += delta
        assert expected.startswith(shown), f"{shown!r} is not a prefix of {expected!r}"
    assert shown == expected


def test_stop_string_cuts_exactly(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The answer is 42. Observation: done"
    deltas, out = _run_output(tokenizer, text, ["Observation:"])
    assert out.stopped
    _assert_never_leaks(deltas, "The answer is 42. ")


def test_stop_string_spanning_two_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = _encode(tokenizer, text)
    pieces = [_decode(tokenizer, ids[: i + 1]) for i in range(len(ids))]
    # The end of token 2 plus the start of token 3 (" quick", " brown" -> "ck br").
    end_of_2 = pieces[1][len(pieces[0]) :]
    start_of_3 = pieces[2][len(pieces[1]) :]
    stop = end_of_2[-2:] + start_of_3[:3]
    assert stop not in pieces[1] and stop in pieces[2]
    deltas, out = _run_output(tokenizer, text, [stop])
    assert out.stopped
    _assert_never_leaks(deltas, text[: text.index(stop)])


def test_stop_string_inside_one_token(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Alpha beta gamma delta"
    deltas, out = _run_output(tokenizer, text, ["amm"])
    assert out.stopped
    _assert_never_leaks(deltas, "Alpha beta g")


def test_multibyte_stop_string(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "中文测试。你好世界。后面"
    deltas, out = _run_output(tokenizer, text, ["世界"])
    assert out.stopped
    _assert_never_leaks(deltas, "中文测试。你好")


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "one two three four five"
    deltas, out = _run_output(tokenizer, text, ["four", "two", "three"])
    assert out.stopped
    _assert_never_leaks(deltas, "one ")


def test_partial_stop_string_is_released_at_the_end(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Counting: one, two, thr"
    deltas, out = _run_output(tokenizer, text, ["three"])
    assert not out.stopped
    _assert_never_leaks(deltas, text)
    # "thr" (and the space before it, maybe) was held back until the end.
    assert not "".join(deltas[:-1]).endswith("thr")


def test_no_stop_strings_streams_everything(tokenizer: PreTrainedTokenizerBase) -> None:
    text = TEXTS[0]
    deltas, _ = _run_output(tokenizer, text, [])
    assert "".join(deltas) == text
    assert deltas[-1] == ""  # nothing held back


def test_stop_filter_holds_back_only_possible_stop_starts() -> None:
    f = StopStringFilter(["abcd", "xy"])
    assert f.feed("hello abc") == "hello "  # "abc" may become "abcd"
    assert f.feed("e") == "abce"  # it did not
    assert f.feed("x") == ""  # may become "xy"
    assert f.feed("abcd") == "x"  # the stop starts right after the "x"
    assert f.stopped and f.matched == "abcd"
    assert f.feed("more") == ""
    assert f.flush() == ""


def test_stop_filter_held_text_is_bounded() -> None:
    stops = ["<|end of turn|>", "###"]
    f = StopStringFilter(stops)
    longest = max(len(s) for s in stops)
    fed = released = 0
    for ch in "some text <|end of t" + "urn?" + " and ## then # and more":
        fed += 1
        released += len(f.feed(ch))
        assert fed - released <= longest - 1
    released += len(f.flush())
    assert not f.stopped and released == fed
