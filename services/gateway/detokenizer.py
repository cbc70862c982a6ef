"""Incremental detokenization and stop strings.

Token-by-token decoding is wrong for most tokenizers: a byte-level BPE token can hold
half of a UTF-8 character, and sentencepiece drops the leading space of the first
token of a decode. So each step decodes a small window of tokens twice: the tokens
already turned into text just before the new ones (prefix_offset:read_offset) and the
same plus the new ones (prefix_offset:); the new text is the difference. The window
slides only once the text is complete (does not end in U+FFFD).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this are already text

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special)
        assert isinstance(text, str)
        return text

    def add(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the text they complete (maybe "" while a character is partial)."""
        self._ids.extend(token_ids)
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            # Either nothing visible yet (special tokens) or a character cut in the middle.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back at the end of the output (e.g. a trailing U+FFFD)."""
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


class StopStringFilter:
    """Cuts the output before the first stop string, and never lets part of one out.

    Text that could be the start of a stop string is held back until the next text
    shows whether it is one.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = sorted({s for s in stops if s}, key=len)
        self._pending = ""  # text received but not released yet
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Returns the text that is safe to release now."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        # Earliest complete stop string wins.
        cut: int | None = None
        for stop in self._stops:
            pos = self._pending.find(stop)
            if pos >= 0 and (cut is None or pos < cut):
                cut, self.matched = pos, stop
        if cut is not None:
            out = self._pending[:cut]
            self._pending = ""
            self.stopped = True
            return out
        keep = self._held_suffix_len(self._pending)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = min(len(text), len(self._stops[-1]) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of the output, the held text turned out not to be a stop string."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        return out


class OutputText:
    """Tokens in, client-visible text out: detokenization followed by stop strings."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._stop = StopStringFilter(stop)

    @property
    def stopped(self) -> bool:
        """True once a stop string was seen: no more text will come out."""
        return self._stop.stopped

    def add(self, token_ids: Iterable[int]) -> str:
        if self._stop.stopped:
            return ""
        return self._stop.feed(self._detok.add(token_ids))

    def finish(self) -> str:
        """The rest of the text once the output has ended."""
        if self._stop.stopped:
            return ""
        return self._stop.feed(self._detok.flush()) + self._stop.flush()
