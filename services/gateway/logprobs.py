"""Logprobs in OpenAI's shapes, from the token ids and raw logprobs the workers send.

Chat answers carry `logprobs.content[]` (token, logprob, bytes, top_logprobs); text
completions the legacy parallel lists (tokens, token_logprobs, top_logprobs, text_offset).
A token's text is its own bytes: a byte-level BPE token may hold part of a UTF-8
character, so `bytes` is exact and `token` is those bytes decoded with U+FFFD for a
partial character. The logprobs are the raw model's (before penalties, grammar masks and
temperature), as the workers' sampler returns them.

Streaming gives each chunk the logprobs of the tokens whose text it carries (tokens held
back, e.g. as a possible stop string, come with a later chunk): the chunks' lists put
together are the whole answer's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from services.gateway.protocol import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)

# JSON has no -inf: a token the model gives no chance at all is shown this unlikely (vLLM's).
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's raw logprob, and the most probable tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most probable first


def _finite(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """The bytes of each vocabulary token, by the tokenizer's own decoder kind (cached)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._compute(token_id)
        return found

    def _compute(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if token_id in self._special:
            return piece.encode()
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # sentencepiece byte fallback
        if "\u2581" in piece:  # sentencepiece's word boundary
            return piece.replace("\u2581", " ").encode()
        text = self._tokenizer.decode([token_id])
        return text.encode() if isinstance(text, str) else piece.encode()

    def text(self, token_id: int) -> str:
        return self(token_id).decode("utf-8", errors="replace")


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def chat_logprobs(token_bytes: TokenBytes, items: Sequence[TokenLogprob]) -> ChatChoiceLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        raw = token_bytes(token_id)
        return TopLogprob(
            token=raw.decode("utf-8", errors="replace"), logprob=_finite(logprob), bytes=list(raw)
        )

    content = []
    for item in items:
        head = entry(item.token_id, item.logprob)
        top = [entry(t, lp) for t, lp in item.top]
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


class CompletionLogprobBuilder:
    """Legacy completions logprobs of one choice, chunk after chunk: text_offset runs on
    across chunks, from where the choice's text starts (after an echoed prompt)."""

    def __init__(self, token_bytes: TokenBytes, start_offset: int = 0) -> None:
        self._bytes = token_bytes
        self._offset = start_offset

    def build(self, items: Iterable[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for item in items:
            token = self._bytes.text(item.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(_finite(item.logprob))
            # The chosen token is always among them (OpenAI: up to logprobs + 1 entries).
            top = {self._bytes.text(t): _finite(lp) for t, lp in item.top}
            top.setdefault(token, _finite(item.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(self._offset)
            self._offset += len(token)
        return out


class _TopLike(Protocol):
    token_ids: Sequence[int]
    logprobs: Sequence[float]


def from_wire(
    token_ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[_TopLike]
) -> list[TokenLogprob]:
    """A worker's tokens with their logprobs (and alternatives, when it sent them)."""
    out = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=False)):
        top = tops[i] if i < len(tops) else None
        alternatives = tuple(zip(top.token_ids, top.logprobs, strict=False)) if top else ()
        out.append(TokenLogprob(int(token_id), float(logprob), alternatives))
    return out


_token_bytes: dict[int, tuple[PreTrainedTokenizerBase, TokenBytes]] = {}


def token_bytes_for(tokenizer: PreTrainedTokenizerBase) -> TokenBytes:
    """One TokenBytes (and its cache) per tokenizer."""
    found = _token_bytes.get(id(tokenizer))
    if found is None or found[0] is not tokenizer:
        found = _token_bytes[id(tokenizer)] = (tokenizer, TokenBytes(tokenizer))
    return found[1]
