"""A chat answer's text -> reasoning, content and tool calls, whole or streamed.

The text goes through the reasoning parser first (what is inside <think>), then what is
left through the tool-call parser. Streaming and non-streaming use the same parsers, so a
streamed answer put back together is the non-streamed one. Each answer (choice index) has
its own parsers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from services.gateway.generate import GenerationEvent, TextDelta
from services.gateway.logprobs import TokenBytes, TokenLogprob, chat_logprobs
from services.gateway.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from services.gateway.reasoning import REASONING_PARSERS, ReasoningParser, make_reasoning_parser
from services.gateway.tool_parsers import (
    TOOL_PARSERS,
    ToolCallPiece,
    ToolParser,
    make_tool_parser,
)


def check_parser_names(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    """At startup: a misspelt --tool-call-parser or --reasoning-parser is the operator's."""
    if tool_call_parser and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(
            f"unknown tool call parser {tool_call_parser!r}; known: {', '.join(TOOL_PARSERS)}"
        )
    if reasoning_parser and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(
            f"unknown reasoning parser {reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}"
        )


@dataclass(frozen=True)
class OutputSpec:
    """How a request's answers are to be parsed (from the server flags and the request)."""

    reasoning_parser: str | None = None
    prompt_opens_thinking: bool = False
    tool_parser: str | None = None
    tool_names: frozenset[str] = frozenset()
    max_calls: int | None = None

    def new_choice(self) -> ChoiceOutput:
        reasoning = None
        if self.reasoning_parser:
            reasoning = make_reasoning_parser(self.reasoning_parser, self.prompt_opens_thinking)
        tools = None
        if self.tool_parser and self.tool_names:
            tools = make_tool_parser(self.tool_parser, self.tool_names, max_calls=self.max_calls)
        return ChoiceOutput(reasoning, tools)


@dataclass
class ChoiceDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)


class ChoiceOutput:
    """One answer's parsers, fed its text as it comes."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    @property
    def made_calls(self) -> bool:
        return self._tools is not None and self._tools.num_calls > 0

    def feed(self, text: str) -> ChoiceDelta:
        if self._reasoning is None:
            return self._content(text, end=False)
        split = self._reasoning.feed(text)
        out = self._content(split.content, end=False)
        out.reasoning = split.reasoning
        return out

    def flush(self) -> ChoiceDelta:
        if self._reasoning is None:
            return self._content("", end=True)
        split = self._reasoning.flush()
        out = self._content(split.content, end=True)
        out.reasoning = split.reasoning
        return out

    def finish_reason(self, finish_reason: str) -> str:
        # OpenAI's reason for an answer that ends in tool calls; a cut one stays "length".
        return "tool_calls" if finish_reason == "stop" and self.made_calls else finish_reason

    def _content(self, text: str, *, end: bool) -> ChoiceDelta:
        if self._tools is None:
            return ChoiceDelta(content=text)
        parsed = self._tools.feed(text) if text else None
        out = ChoiceDelta()
        if parsed is not None:
            out.content, out.calls = parsed.content, parsed.calls
        if end:
            rest = self._tools.flush()
            out.content += rest.content
            out.calls += rest.calls
        return out


def whole_message(spec: OutputSpec, text: str) -> tuple[AssistantMessage, ChoiceOutput]:
    """The non-streamed answer: all the text through one choice's parsers."""
    choice = spec.new_choice()
    first, rest = choice.feed(text), choice.flush()
    reasoning = first.reasoning + rest.reasoning
    content = first.content + rest.content
    calls: dict[int, ToolCall] = {}
    for piece in first.calls + rest.calls:
        if piece.id is not None:
            calls[piece.index] = ToolCall(
                id=piece.id, function=FunctionCall(name=piece.name or "", arguments="")
            )
        calls[piece.index].function.arguments += piece.arguments
    message = AssistantMessage(
        # No text besides the calls or the reasoning: null, as OpenAI's API says it.
        content=content if content or not (calls or reasoning) else None,
        reasoning_content=reasoning or None,
        tool_calls=[calls[i] for i in sorted(calls)] or None,
    )
    return message, choice


def _tool_call_deltas(pieces: list[ToolCallPiece]) -> list[DeltaToolCall]:
    out: list[DeltaToolCall] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last is not None and last.index == piece.index and last.function is not None:
            # The same call again within one chunk: one entry with the arguments joined.
            last.function.arguments = (last.function.arguments or "") + piece.arguments
        elif piece.id is not None:
            function = DeltaFunctionCall(name=piece.name, arguments=piece.arguments)
            out.append(
                DeltaToolCall(index=piece.index, id=piece.id, type="function", function=function)
            )
        else:
            function = DeltaFunctionCall(arguments=piece.arguments)
            out.append(DeltaToolCall(index=piece.index, function=function))
    return out


class ChatStream:
    """Chat chunks for sse.event_stream: `parse` turns the generation's raw text into parsed
    deltas, and the formatter methods below turn each one into a chunk.

    `parse` passes a TextDelta on only when its text gave something to show (text held back
    because it may be part of a tag gives no chunk), and queues the parsed delta, which
    `text` takes: event_stream calls `text` once for every TextDelta, in order.
    """

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
        spec: OutputSpec,
        n: int = 1,
        token_bytes: TokenBytes | None = None,  # set when the request asked for logprobs
    ) -> None:
        self._n = n  # choices
        self._token_bytes = token_bytes
        self._id = request_id
        self._created = created
        self._model = model
        self._include_usage = include_usage
        self._spec = spec
        self._choices: dict[int, ChoiceOutput] = {}
        self._ready: dict[int, deque[ChoiceDelta]] = {}

    def _choice(self, index: int) -> ChoiceOutput:
        if index not in self._choices:
            self._choices[index] = self._spec.new_choice()
            self._ready[index] = deque()
        return self._choices[index]

    async def parse(
        self, events: AsyncGenerator[GenerationEvent, None]
    ) -> AsyncGenerator[GenerationEvent, None]:
        last_text: dict[int, TextDelta] = {}
        # Logprobs of text the parsers hold back: they go with the chunk that shows it.
        held: dict[int, list[TokenLogprob]] = {}
        async with aclosing(events):
            async for event in events:
                # Events of several choices will say whose they are; until then, all are 0's.
                index: int = getattr(event, "index", 0)
                choice = self._choice(index)
                if isinstance(event, TextDelta):
                    last_text[index] = event
                    delta = choice.feed(event.text)
                    if delta:
                        self._ready[index].append(delta)
                        yield replace(event, logprobs=(*held.pop(index, ()), *event.logprobs))
                    else:
                        held.setdefault(index, []).extend(event.logprobs)
                    continue
                delta = choice.flush()  # only text fed before can come out: last_text is set
                rest = tuple(held.pop(index, ()))
                if delta or rest:
                    self._ready[index].append(delta)
                    yield replace(last_text[index], text="", logprobs=rest)
                yield replace(event, finish_reason=choice.finish_reason(event.finish_reason))

    def _chunk(
        self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None
    ) -> dict[str, Any]:
        data = ChatCompletionChunk(
            id=self._id, created=self._created, model=self._model, choices=choices, usage=usage
        ).model_dump(mode="json")
        if not self._include_usage:
            del data["usage"]  # OpenAI only sends the key when usage was asked for
        return data

    def opening(self) -> list[dict[str, Any]]:
        delta = DeltaMessage(role="assistant", content="")
        return [
            self._chunk([ChatCompletionStreamChoice(index=i, delta=delta)]) for i in range(self._n)
        ]

    def text(
        self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]:
        parsed = self._ready[index].popleft()
        delta = DeltaMessage(
            content=parsed.content or None,
            reasoning_content=parsed.reasoning or None,
            tool_calls=_tool_call_deltas(parsed.calls) or None,
        )
        choice = ChatCompletionStreamChoice(index=index, delta=delta)
        if self._token_bytes is not None:
            choice.logprobs = chat_logprobs(self._token_bytes, logprobs)
        return self._chunk([choice])

    def finish(
        self, finish_reason: str, index: int = 0, routed_experts: str | None = None
    ) -> dict[str, Any]:
        choice = ChatCompletionStreamChoice(
            index=index,
            delta=DeltaMessage(),
            finish_reason=finish_reason,
            routed_experts=routed_experts,
        )
        return self._chunk([choice])

    def usage(self, usage: UsageInfo) -> dict[str, Any]:
        return self._chunk([], usage)
