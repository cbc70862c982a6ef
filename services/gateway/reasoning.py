"""Reasoning apart from the answer: `<think>...</think>` -> reasoning_content (streamed too).

`--reasoning-parser` names the model family, as in SGLang:
- deepseek-r1: the answer starts in reasoning (R1's template opens `<think>` in the prompt)
  and the reasoning lasts until `</think>`; a `<think>` the model writes itself is dropped.
- qwen3: reasoning only when the answer starts with `<think>` (or the prompt ends with it);
  with `enable_thinking: false` the template closes the block itself and all is answer.

The parser is fed text pieces as they come and never lets out part of a tag: the same
text, cut anywhere, gives the same reasoning and answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("deepseek-r1", "qwen3")


@dataclass
class ReasoningSplit:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class _State(Enum):
    START = 0  # not yet known whether the answer opens with <think>
    REASONING = 1
    CONTENT = 2


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    def __init__(self, starts_in_reasoning: bool) -> None:
        # Without a <think> first, an answer starts in reasoning (R1) or in content (Qwen3).
        self._default = _State.REASONING if starts_in_reasoning else _State.CONTENT
        self._state = _State.START
        self._held = ""  # text that may be the start of a tag
        self._strip_leading = True  # whitespace right after a tag is layout, not text

    def feed(self, text: str) -> ReasoningSplit:
        out = ReasoningSplit()
        self._held += text
        while self._held:
            if self._state is _State.START:
                head = self._held.lstrip()
                if head.startswith(THINK_START):
                    self._held = head[len(THINK_START) :]
                    self._state = _State.REASONING
                    self._strip_leading = True
                elif THINK_START.startswith(head):
                    break  # maybe "<thi": wait for more
                else:
                    self._state = self._default
            elif self._state is _State.REASONING:
                end = self._held.find(THINK_END)
                if end >= 0:
                    out.reasoning += self._take(self._held[:end])
                    self._held = self._held[end + len(THINK_END) :]
                    self._state = _State.CONTENT
                    self._strip_leading = True
                    continue
                keep = partial_tag_len(self._held, THINK_END)
                out.reasoning += self._take(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
                break
            else:
                out.content += self._take(self._held)
                self._held = ""
        return out

    def flush(self) -> ReasoningSplit:
        """At the end of the answer: what was held back (a tag that never completed)."""
        held, self._held = self._held, ""
        if self._state is _State.START:
            self._state = self._default
        if self._state is _State.REASONING:
            return ReasoningSplit(reasoning=self._take(held))
        return ReasoningSplit(content=self._take(held))

    def _take(self, text: str) -> str:
        if self._strip_leading:
            text = text.lstrip()
            if text:
                self._strip_leading = False
        return text


def make_reasoning_parser(name: str, prompt_opens_thinking: bool = False) -> ReasoningParser:
    """`prompt_opens_thinking`: the rendered prompt ends with <think> (the template opened it)."""
    if name not in REASONING_PARSERS:
        known = ", ".join(REASONING_PARSERS)
        raise ValueError(f"unknown reasoning parser {name!r}; known: {known}")
    return ReasoningParser(starts_in_reasoning=name == "deepseek-r1" or prompt_opens_thinking)
