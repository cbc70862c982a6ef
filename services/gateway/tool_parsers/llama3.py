"""Llama 3.x JSON calls: the answer is `{"name": ..., "parameters": {...}}` (several joined by
`;`), optionally after `<|python_tag|>`. An answer that starts otherwise is plain text.
"""

from __future__ import annotations

import re
from enum import Enum

from services.gateway.tool_parsers.base import CallReader, JsonValueEnd, ToolParse, ToolParser

PYTHON_TAG = "<|python_tag|>"
_SEPARATORS = re.compile(r"^[\s;]+")  # between calls


class _Mode(Enum):
    UNKNOWN = 0  # the answer's first characters have not come yet
    CALLS = 1
    TEXT = 2


class Llama3JsonToolParser(ToolParser):
    def __init__(self, tool_names: frozenset[str], *, max_calls: int | None = None) -> None:
        super().__init__(tool_names, max_calls=max_calls)
        self._mode = _Mode.UNKNOWN
        self._held = ""
        self._call: CallReader | None = None
        self._space_before_call = ""
        self._call_end = JsonValueEnd()

    def feed(self, text: str) -> ToolParse:
        out = ToolParse()
        self._held += text
        while self._held:
            if self._mode is _Mode.UNKNOWN:
                head = self._held.lstrip()
                if head.startswith(PYTHON_TAG):
                    self._held, self._mode = head[len(PYTHON_TAG) :], _Mode.CALLS
                elif head.startswith("{"):
                    self._held, self._mode = head, _Mode.CALLS
                elif not head or PYTHON_TAG.startswith(head):
                    break
                else:
                    self._mode = _Mode.TEXT
            elif self._mode is _Mode.TEXT:
                out.content += self._content(self._held)
                self._held = ""
            elif self._call is None:
                rest = _SEPARATORS.sub("", self._held, count=1)
                if not rest:
                    self._held = ""  # separators between calls
                elif rest.startswith("{"):
                    self._held = rest
                    self._space_before_call = self._call_starts()
                    self._call, self._call_end = self._new_reader(), JsonValueEnd()
                else:
                    self._held, self._mode = rest, _Mode.TEXT  # text after the calls
            else:
                end = self._call_end.feed(self._held)
                if end is None:
                    out.calls += self._allowed(self._call.feed(self._held))
                    self._held = ""
                else:
                    out.calls += self._allowed(self._call.feed(self._held[:end]))
                    self._held = self._held[end:]
                    out.extend(self._close_call())
        return out

    def flush(self) -> ToolParse:
        out = ToolParse()
        held, self._held = self._held, ""
        if self._call is not None:
            out.calls += self._allowed(self._call.feed(held))
            out.extend(self._close_call())
        elif self._mode is not _Mode.CALLS:
            out.content += self._content(held)
        out.content += self._end_of_text()
        return out

    def _close_call(self) -> ToolParse:
        assert self._call is not None
        call, self._call = self._call, None
        out = ToolParse(calls=self._allowed(call.close()))
        if call.started:
            self._call_ends(self._space_before_call)
        else:
            out.content = self._content(self._space_before_call + call.raw)  # not a call
        return out
