"""Structured outputs: grammars compiled by xgrammar, one matcher per constrained sequence.

A request may constrain its answer by a JSON schema, "any JSON object", a regex or an EBNF
grammar (a GrammarSpec, which travels in the sampling parameters). Every worker that
samples a token of the answer holds the same grammar: the prefill worker masks the first
token's logits with a fresh matcher; the decode worker compiles the same grammar (a cache
hit after the first time), lets its matcher accept the first token, then masks every step.

The masks are xgrammar's packed bitmasks, which the sampler applies (shared/sampler.py,
TokenMask). A matcher's stop tokens are the request's stop ids (EOS unless ignore_eos):
they are allowed only where the grammar may end, and accepting one terminates it.

xgrammar is imported lazily: the gateway only checks a grammar's syntax, and processes
that never see a grammar never load it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import xgrammar

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf")
# "Any JSON object" is the schema of an object: the same grammar machinery, no whitespace
# runs (a model may otherwise wander in whitespace forever).
_ANY_OBJECT = '{"type": "object"}'
_CACHE_SIZE = 128  # compiled grammars kept per worker (LRU)
# xgrammar's errors start with "[time] /path/file.cc:line: ": the client needs the rest.
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (?:Check failed: .*? is false: )?")


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled (the client's mistake)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's answer must match."""

    kind: str  # one of GRAMMAR_KINDS
    source: str = ""  # the JSON schema (as JSON text), the regex or the EBNF; "" for json_object

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; known: {GRAMMAR_KINDS}")


def _xgr() -> Any:
    import xgrammar

    return xgrammar


def _clean(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _NATIVE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


def check_grammar(spec: GrammarSpec) -> None:
    """Raises GrammarError unless the spec parses. Needs no tokenizer (the gateway's check)."""
    xgr = _xgr()
    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(_schema_text(spec.source), any_whitespace=False)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.source)
        elif spec.kind == "ebnf":
            xgr.Grammar.from_ebnf(spec.source)
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError (and others) for bad input
        raise GrammarError(f"invalid {spec.kind}: {_clean(exc)}") from None


def _schema_text(source: str) -> str:
    try:
        schema = json.loads(source)
    except ValueError as exc:
        raise GrammarError(f"invalid json_schema: not JSON ({exc})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("invalid json_schema: a schema is a JSON object")
    return source


@dataclass(frozen=True)
class TokenMask:
    """The tokens some rows of a batch may take next, as xgrammar's packed bitmask: token t
    is allowed in row rows[j] when bit t % 32 of bits[j, t // 32] is set."""

    bits: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)], on the CPU
    rows: tuple[int, ...]

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """bool [len(rows), vocab_size]: True where the token may be sampled."""
        packed = self.bits.contiguous().numpy().view(np.uint8)
        # Little-endian words: byte 4w + k holds tokens 32w + 8k .. 32w + 8k + 7, lowest first.
        unpacked = np.unpackbits(packed, axis=1, count=vocab_size, bitorder="little")
        return torch.from_numpy(unpacked).bool()

    def expand(self, n: int) -> TokenMask:
        """This one-row mask for n rows (the choices of one prompt share their first mask)."""
        return TokenMask(self.bits.expand(n, -1), tuple(range(n)))


# xgrammar 0.2.8 writes the characters of a length-bounded JSON string (minLength,
# maxLength) as this class, which lets raw control characters through: not JSON. Its
# unbounded strings exclude them, as JSON does; the bounded ones get the same class.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def _json_grammar(schema: str) -> xgrammar.Grammar:
    xgr = _xgr()
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


# A quoted literal or a character class (left as they are), or the rule name `root`.
_ROOT_NAME = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|\broot\b')


def tool_calls_ebnf(
    call_schemas: Sequence[str],
    *,
    begin: str,
    end: str,
    separator: str,
    max_calls: int | None = None,
) -> str:
    """EBNF of an answer made of tool calls only: `begin`, a JSON value matching one of
    `call_schemas` (JSON schemas, as text), `end`; more calls after `separator`, up to
    max_calls (None: any number). Raises GrammarError for a schema xgrammar refuses."""
    if not call_schemas:
        raise GrammarError("no tool to call")
    xgr = _xgr()
    try:
        grammars = [_json_grammar(_schema_text(schema)) for schema in call_schemas]
        union = grammars[0] if len(grammars) == 1 else xgr.Grammar.union(*grammars)
    except GrammarError:
        raise
    except Exception as exc:
        raise GrammarError(f"invalid tool parameters: {_clean(exc)}") from None
    body = _ROOT_NAME.sub(lambda m: "tool_call" if m.group(0) == "root" else m.group(0), str(union))
    one = f"{_literal(begin)} tool_call {_literal(end)}"
    more = "" if max_calls == 1 else f" ({_literal(separator)} {one})*"
    if max_calls is not None and max_calls > 1:
        more = f" ({_literal(separator)} {one}){{0,{max_calls - 1}}}"
    return f"{body}\nroot ::= {one}{more}\n"


def _literal(text: str) -> str:
    """An EBNF string literal (JSON's escapes are EBNF's)."""
    return json.dumps(text, ensure_ascii=False)


class SequenceGrammar:
    """The grammar state of one sequence: what it has written so far."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advances over a sampled token; False if the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: the answer is complete."""
        return bool(self.matcher.is_terminated())


class GrammarBackend:
    """A worker's grammar compiler: the tokenizer's vocabulary read once, on the first
    grammar, and compiled grammars kept in an LRU. Thread-safe (the engine thread and the
    gRPC threads both use it)."""

    def __init__(self, model_dir: Path | str, vocab_size: int, cache_size: int = _CACHE_SIZE):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                from transformers import AutoTokenizer

                xgr = _xgr()
                tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
                # Our own LRU below bounds what is kept; the compiler's cache would keep more.
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """The compiled grammar (cached). Raises GrammarError for a bad spec."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        compiler = self._get_compiler()
        try:
            if spec.kind in ("json_schema", "json_object"):
                source = _schema_text(spec.source) if spec.kind == "json_schema" else _ANY_OBJECT
                compiled = compiler.compile_grammar(_json_grammar(source))
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.source)
            else:
                compiled = compiler.compile_grammar(spec.source)
        except GrammarError:
            raise
        except Exception as exc:
            raise GrammarError(f"invalid {spec.kind}: {_clean(exc)}") from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec, stop_token_ids: Sequence[int]) -> SequenceGrammar:
        """A fresh matcher at the start of the answer.

        Its stop tokens are the request's (EOS unless ignore_eos); without any, the
        tokenizer's EOS, so that a grammar can always end its answer.
        """
        compiled = self.compile(spec)
        stops = [t for t in stop_token_ids if t < self.vocab_size] or None
        return SequenceGrammar(_xgr().GrammarMatcher(compiled, override_stop_tokens=stops))


def fill_masks(grammars: Sequence[SequenceGrammar | None], vocab_size: int) -> TokenMask | None:
    """The next-token masks of the rows that have a grammar; None when no row has one.

    Several rows are filled by xgrammar's batch matcher, on several threads.
    """
    rows = tuple(i for i, g in enumerate(grammars) if g is not None)
    if not rows:
        return None
    xgr = _xgr()
    bits = xgr.allocate_token_bitmask(len(rows), vocab_size)
    matchers = [g.matcher for g in grammars if g is not None]
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(bits, 0)
    else:
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bits)
    return TokenMask(bits, rows)


_batch = threading.local()


def _batch_matcher() -> Any:
    matcher = getattr(_batch, "matcher", None)
    if matcher is None:
        matcher = _batch.matcher = _xgr().BatchGrammarMatcher()
    return matcher
