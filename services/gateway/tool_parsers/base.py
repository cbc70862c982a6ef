"""What every tool-call parser shares: the output it produces and how one call is read.

A parser is fed the answer's text piece by piece (as the detokenizer releases it) and
returns, each time, the plain text that is safe to show and the tool-call pieces found:
a call's id and name once its name is complete, then its arguments as they arrive.
Fed the same text cut in any other way, it returns the same text and the same calls:
the streamed answer, put back together, is the non-streamed one.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class ToolCallPiece:
    """A piece of call number `index`: the first has id and name, later ones arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolParse:
    content: str = ""
    calls: list[ToolCallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)

    def extend(self, other: ToolParse) -> None:
        self.content += other.content
        self.calls.extend(other.calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class JsonValueEnd:
    """Finds where a JSON object or array ends, fed piece by piece (strings and escapes aware)."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.done = False

    def feed(self, text: str) -> int | None:
        """The offset in `text` just past the value's last character, once it has come."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self.done = True
                    return i + 1
        return None


# `{"name": "f", "arguments": ` -- the order every supported model writes its calls in.
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


class CallReader:
    """One call's JSON text, `{"name": ..., "arguments": {...}}`, read as it arrives.

    The name is released once complete (if it is one of the request's tools), and an
    object of arguments is streamed as the model writes it. Anything else (keys in another
    order, arguments as a string) is read whole when the call ends.
    """

    def __init__(self, index: int, tool_names: frozenset[str]) -> None:
        self.index = index
        self._tool_names = tool_names
        self.raw = ""  # the call's text so far
        self.started = False  # id and name released
        self._args_from: int | None = None  # offset of the arguments' value in `raw`
        self._args_sent = 0  # characters of the value released so far
        self._args_end = JsonValueEnd()
        self._args_streamed = False

    def feed(self, text: str) -> list[ToolCallPiece]:
        self.raw += text
        out: list[ToolCallPiece] = []
        if self._args_from is None:
            head = _CALL_HEAD.match(self.raw)
            if head is None:
                return out
            name = _json_string(head.group(1))
            if name is None or name not in self._tool_names:
                self._args_from = -1  # not a call to release as it comes: read it at the end
                return out
            self._args_from = head.end()
            self.started = True
            out.append(ToolCallPiece(self.index, new_call_id(), name))
        if self._args_from < 0 or self._args_end.done:
            return out
        value = self.raw[self._args_from :]
        if not self._args_streamed:
            stripped = value.lstrip()
            if not stripped:
                return out
            if stripped[0] != "{":
                self._args_end.done = True  # a string or other value: taken whole at the end
                return out
            self._args_from += len(value) - len(stripped)
            self._args_streamed = True
            value = stripped
        new = value[self._args_sent :]
        end = self._args_end.feed(new)
        piece = new if end is None else new[:end]
        self._args_sent += len(piece)
        if piece:
            out.append(ToolCallPiece(self.index, arguments=piece))
        return out

    def close(self) -> list[ToolCallPiece]:
        """The call's text is complete: what is still to release. If nothing was released and
        the text is no call (invalid JSON, an unknown function), `started` stays False."""
        if self.started:
            if self._args_streamed:
                return []  # all released (arguments cut short stay as the model wrote them)
            return [ToolCallPiece(self.index, arguments=self._whole_arguments())]
        parsed = _parse_call(self.raw)
        if parsed is None or parsed[0] not in self._tool_names:
            return []
        self.started = True
        return [ToolCallPiece(self.index, new_call_id(), parsed[0], parsed[1])]

    def _whole_arguments(self) -> str:
        parsed = _parse_call(self.raw)
        if parsed is not None:
            return parsed[1]
        # Not valid JSON: the value's text as written, less the call's closing brace.
        assert self._args_from is not None
        value = self.raw[self._args_from :].strip()
        return value[:-1].rstrip() if value.endswith("}") else value


def _json_string(body: str) -> str | None:
    try:
        value = json.loads(f'"{body}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a complete call object, or None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


class ToolParser(ABC):
    """Plain text and tool calls out of an answer's text. One parser per answer (choice)."""

    def __init__(self, tool_names: frozenset[str], *, max_calls: int | None = None) -> None:
        self.tool_names = tool_names
        self.max_calls = max_calls  # parallel_tool_calls=false: 1
        self.num_calls = 0  # calls released so far
        self._held_space = ""  # trailing whitespace of the text so far: dropped if a call follows
        self._gap = ""  # whitespace between text and the calls after it, if more text follows
        self._after_call = False  # whitespace right after a call is dropped
        self._said = False  # some text was released

    @abstractmethod
    def feed(self, text: str) -> ToolParse: ...

    @abstractmethod
    def flush(self) -> ToolParse:
        """The end of the answer: releases whatever was held back."""

    # Helpers for the parsers: the text around calls ("Hi <call> Bye" says "Hi Bye"), and
    # the calls' bookkeeping.

    def _content(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
            text, self._gap = self._gap + text, ""
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        self._said = self._said or bool(body)
        return body

    def _call_starts(self) -> str:
        """Takes the whitespace before the call: to give back if it is no call after all."""
        space, self._held_space = self._held_space, ""
        return space

    def _call_ends(self, space_before: str) -> None:
        if not self._after_call:
            self._gap = space_before if self._said else ""
        self._after_call = True

    def _end_of_text(self) -> str:
        """Trailing whitespace: kept in a plain answer, dropped after calls."""
        held, self._held_space = self._held_space, ""
        return "" if self.num_calls else held

    def _new_reader(self) -> CallReader:
        return CallReader(self.num_calls, self.tool_names)

    def _allowed(self, pieces: list[ToolCallPiece]) -> list[ToolCallPiece]:
        """Drops calls past max_calls; counts the calls that start."""
        out = []
        for piece in pieces:
            if self.max_calls is not None and piece.index >= self.max_calls:
                continue
            if piece.id is not None:
                self.num_calls = piece.index + 1
            out.append(piece)
        return out
