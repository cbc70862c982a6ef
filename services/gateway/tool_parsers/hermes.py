"""Hermes / Qwen 2.5 / Qwen 3 calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Text outside the tags is the answer's content. A call whose JSON does not parse, or that
names a function the request did not offer, is shown as the text it was.
"""

from __future__ import annotations

from services.gateway.reasoning import partial_tag_len
from services.gateway.tool_parsers.base import CallReader, ToolParse, ToolParser

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"


class HermesToolParser(ToolParser):
    def __init__(self, tool_names: frozenset[str], *, max_calls: int | None = None) -> None:
        super().__init__(tool_names, max_calls=max_calls)
        self._held = ""  # text not parsed yet: maybe part of a tag
        self._call: CallReader | None = None
        self._space_before_call = ""

    def feed(self, text: str) -> ToolParse:
        out = ToolParse()
        self._held += text
        while True:
            if self._call is None:
                start = self._held.find(CALL_START)
                if start < 0:
                    keep = partial_tag_len(self._held, CALL_START)
                    out.content += self._content(self._held[: len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep :]
                    return out
                out.content += self._content(self._held[:start])
                self._held = self._held[start + len(CALL_START) :]
                self._space_before_call = self._call_starts()
                self._call = self._new_reader()
                continue
            end = self._held.find(CALL_END)
            if end < 0:
                keep = partial_tag_len(self._held, CALL_END)
                out.calls += self._allowed(self._call.feed(self._held[: len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep :]
                return out
            out.calls += self._allowed(self._call.feed(self._held[:end]))
            self._held = self._held[end + len(CALL_END) :]
            out.extend(self._close_call(complete=True))

    def flush(self) -> ToolParse:
        out = ToolParse()
        held, self._held = self._held, ""
        if self._call is not None:
            # The answer ended inside a call (max_tokens): keep it if its JSON is whole.
            out.calls += self._allowed(self._call.feed(held))
            out.extend(self._close_call(complete=False))
        else:
            out.content += self._content(held)
        out.content += self._end_of_text()
        return out

    def _close_call(self, *, complete: bool) -> ToolParse:
        assert self._call is not None
        call, self._call = self._call, None
        out = ToolParse(calls=self._allowed(call.close()))
        if call.started:
            self._call_ends(self._space_before_call)
        else:
            # Not a call after all: the model's text, tags included, is the answer.
            raw = CALL_START + call.raw + (CALL_END if complete else "")
            out.content = self._content(self._space_before_call + raw)
        return out
