"""Grammars (shared/grammar.py) and the sampler's masks: every masked draw obeys the grammar,
greedy or not, and answers built token by token from random logits match their spec."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.grammar import (
    GrammarBackend,
    GrammarError,
    GrammarSpec,
    TokenMask,
    check_grammar,
    fill_masks,
    tool_calls_ebnf,
)
from shared.rpc.convert import sampling_from_pb, sampling_to_pb
from shared.sampler import SamplingParams, TokenHistory, sample, sample_tokens, token_distribution

VOCAB = 49152
EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
}
REGEX = r"(cat|dog)-[0-9]{2,4}"


@pytest.fixture(scope="module")
def backend(default_model_dir: Path) -> GrammarBackend:
    return GrammarBackend(default_model_dir, VOCAB)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("json_schema", '{"type": 5}'), "invalid json_schema"),
        (GrammarSpec("json_schema", "not json"), "not JSON"),
        (GrammarSpec("json_schema", "[1, 2]"), "a schema is a JSON object"),
        (GrammarSpec("regex", "(ab"), "parenthesis"),
        (GrammarSpec("ebnf", "root ::= foo"), "not defined"),
    ],
)
def test_bad_specs_are_grammar_errors_with_a_clean_message(spec: GrammarSpec, message: str) -> None:
    with pytest.raises(GrammarError) as info:
        check_grammar(spec)
    assert message in str(info.value)
    assert ".cc:" not in str(info.value)  # no C++ source position for the client


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        GrammarSpec("xml", "<a/>")


def test_good_specs_pass_the_check() -> None:
    check_grammar(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    check_grammar(GrammarSpec("json_object"))
    check_grammar(GrammarSpec("regex", REGEX))
    check_grammar(GrammarSpec("ebnf", 'root ::= "yes" | "no"'))


def test_compiled_grammars_are_cached_lru(default_model_dir: Path) -> None:
    small = GrammarBackend(default_model_dir, VOCAB, cache_size=2)
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    first = small.compile(a)
    assert small.compile(a) is first
    small.compile(b)
    small.compile(c)  # evicts a, the least recently used
    assert small.compile(c) is small.compile(c)
    assert small.compile(a) is not first


def test_backend_refuses_bad_specs(backend: GrammarBackend) -> None:
    with pytest.raises(GrammarError, match="invalid regex"):
        backend.compile(GrammarSpec("regex", "[z-a]"))


def test_token_mask_unpacks_like_xgrammar() -> None:
    bits = torch.randint(-(2**31), 2**31 - 1, (3, (VOCAB + 31) // 32), dtype=torch.int32)
    logits = torch.randn(3, VOCAB)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bits)
    allowed = TokenMask(bits, (0, 1, 2)).allowed(VOCAB)
    assert torch.equal(torch.isfinite(expected), allowed)


def _constrained_answer(
    backend: GrammarBackend,
    spec: GrammarSpec,
    params: SamplingParams,
    seed: int,
    max_steps: int = 80,
    favour: tuple[int, ...] = (),
) -> list[int]:
    """Tokens drawn from random logits under the grammar until its stop token (the tokens
    in `favour` made likelier, so that a nesting grammar ends soon)."""
    grammar = backend.matcher(spec, [EOS])
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for step in range(max_steps):
        logits = torch.randn(1, VOCAB, generator=gen) * 4
        logits[0, list(favour)] += 16.0
        mask = fill_masks([grammar], VOCAB)
        assert mask is not None
        token = sample(logits, [params], [step], mask=mask)[0][0]
        assert mask.allowed(VOCAB)[0, token], "sampled a token the grammar forbids"
        assert grammar.accept(token)
        if grammar.terminated:
            assert token == EOS
            return out
        out.append(token)
    raise AssertionError(f"no end in {max_steps} tokens: {out}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_answers_fullmatch(
    backend: GrammarBackend, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> None:
    spec = GrammarSpec("regex", REGEX)
    for seed in range(5):
        params = SamplingParams(temperature=temperature, seed=seed)
        text = tokenizer.decode(_constrained_answer(backend, spec, params, seed))
        assert re.fullmatch(REGEX, text), text


def test_json_schema_answers_validate(
    backend: GrammarBackend, tokenizer: PreTrainedTokenizerBase
) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for seed in range(5):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        text = tokenizer.decode(_constrained_answer(backend, spec, params, seed, 200))
        jsonschema.validate(json.loads(text), SCHEMA)
        # any_whitespace=False: one space after "," and ":" at most, never a run or a newline.
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert "\n" not in outside_strings and "  " not in outside_strings, text


def test_json_object_answers_are_objects(
    backend: GrammarBackend, tokenizer: PreTrainedTokenizerBase
) -> None:
    spec = GrammarSpec("json_object")
    # Random logits nest objects and arrays without end: closing brackets made likelier.
    closing = tuple(tokenizer.convert_tokens_to_ids(["}", "]", '"']))
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed)
        answer = _constrained_answer(backend, spec, params, seed, 400, favour=closing)
        assert isinstance(json.loads(tokenizer.decode(answer)), dict)


def test_masked_distribution_has_no_mass_outside_the_grammar(backend: GrammarBackend) -> None:
    grammar = backend.matcher(GrammarSpec("regex", "[0-9]+"), [EOS])
    mask = fill_masks([None, grammar], VOCAB)
    assert mask is not None and mask.rows == (1,)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=1)] * 2
    dist = token_distribution(logits, params, [0, 0], mask=mask)
    allowed = mask.allowed(VOCAB)[0]
    assert float(dist[1][~allowed].sum()) == 0.0
    assert float(dist[1][allowed].sum()) == pytest.approx(1.0)
    assert bool((dist[0] > 0).all())  # the other row is untouched


def test_min_tokens_gives_way_to_the_grammar_end(backend: GrammarBackend) -> None:
    # After "7" the grammar "[0-9]" only allows its stop token, which min_tokens masks.
    grammar = backend.matcher(GrammarSpec("regex", "[0-9]"), [EOS])
    digit = xgr.TokenizerInfo.from_huggingface(
        AutoTokenizer.from_pretrained(str(backend.model_dir)), vocab_size=VOCAB
    ).decoded_vocab.index(b"7")
    assert grammar.accept(digit)
    mask = fill_masks([grammar], VOCAB)
    params = SamplingParams(temperature=0.0, stop_token_ids=(EOS,), min_new_tokens=5)
    logits = torch.zeros(1, VOCAB)
    tokens, _ = sample(logits, [params], [1], histories=[TokenHistory([1], [digit])], mask=mask)
    assert tokens == [EOS]


def test_top_logprobs_are_the_raw_best() -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(4)) * 3
    params = [
        SamplingParams(temperature=0.0, top_logprobs=5),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0, seed=2, top_logprobs=20),
    ]
    tokens, logprobs, top = sample_tokens(logits, params, [0, 0, 0])
    ref = torch.log_softmax(logits, -1)
    assert top[1] == ((), ())
    for row, k in ((0, 5), (2, 20)):
        ids, values = top[row]
        best = torch.topk(ref[row], k)
        assert list(ids) == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-6)
    assert top[0][0][0] == tokens[0]  # greedy: the best is the chosen one
    assert top[0][1][0] == pytest.approx(logprobs[0], abs=1e-6)


def test_top_logprobs_range_is_checked() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)


def test_grammar_and_top_logprobs_cross_the_wire() -> None:
    params = SamplingParams(top_logprobs=3, grammar=GrammarSpec("regex", REGEX))
    assert sampling_from_pb(sampling_to_pb(params)) == params
    assert sampling_from_pb(sampling_to_pb(SamplingParams())).grammar is None


def test_bounded_json_strings_allow_no_raw_control_characters(
    backend: GrammarBackend, tokenizer: PreTrainedTokenizerBase
) -> None:
    # xgrammar's own grammar for maxLength strings lets "\x1e" through: not JSON.
    control = [i for i in range(VOCAB) if tokenizer.decode([i]) in ("\x1e", "\x01", "\t")]
    assert control
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}}}
    grammar = backend.matcher(GrammarSpec("json_schema", json.dumps(schema)), [EOS])
    assert grammar.matcher.accept_string('{"s": "ab')
    mask = fill_masks([grammar], VOCAB)
    assert mask is not None
    allowed = mask.allowed(VOCAB)[0]
    assert not any(bool(allowed[i]) for i in control)
    assert bool(allowed[tokenizer.convert_tokens_to_ids("x")])


def test_tool_calls_grammar_takes_only_calls_of_the_tools(backend: GrammarBackend) -> None:
    def call(name: str) -> str:
        params = {"type": "object", "properties": {"root": {"enum": ["x", "y"]}}}
        return json.dumps(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )

    ebnf = tool_calls_ebnf(
        [call("a"), call("b")], begin="<c>", end="</c>", separator="\n", max_calls=2
    )
    spec = GrammarSpec("ebnf", ebnf)
    one = '<c>{"name": "a", "arguments": {"root": "x"}}</c>'
    two = one + '\n<c>{"name": "b", "arguments": {}}</c>'
    for text, ok in (
        (one, True),
        (two, True),  # a property named "root" is not the grammar's root rule
        (two + "\n" + one, False),  # max_calls
        ('<c>{"name": "c", "arguments": {}}</c>', False),
        ("plain text", False),
    ):
        grammar = backend.matcher(spec, [EOS])
        accepted = grammar.matcher.accept_string(text) and grammar.accept(EOS)
        assert accepted == ok, text
    with pytest.raises(GrammarError, match="tool parameters"):
        tool_calls_ebnf(['{"type": 7}'], begin="", end="", separator="")
