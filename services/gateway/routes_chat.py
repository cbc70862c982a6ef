"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from services.gateway.errors import bad_request, not_supported
from services.gateway.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from services.gateway.routes_common import (
    reject_unsupported_sampling,
    respond,
)
from services.gateway.sampling import build_plan, new_request_id
from services.gateway.state import get_state

router = APIRouter()


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts: list[str] = []
        for part in content:
            param = f"messages.{index}.content"
            if part.type != "text":
                raise not_supported(f"message content of type {part.type!r}", param)
            if part.text is None:
                raise bad_request("a content part of type 'text' needs a 'text' field", param)
            texts.append(part.text)
        text = "\n".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": text}
    if message.name is not None:
        out["name"] = message.name
    return out


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    reject_unsupported_sampling(body)
    if body.logprobs or body.top_logprobs:
        raise not_supported("logprobs", "logprobs")
    if body.tools:
        raise not_supported("tools (function calling)", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise not_supported(
            f"response_format {body.response_format.get('type')!r}", "response_format"
        )


class _ChatChunks:
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._id = request_id
        self._created = created
        self._model = model
        self._include_usage = include_usage

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
        return [self._chunk([ChatCompletionStreamChoice(index=0, delta=delta)])]

    def text(self, text: str) -> dict[str, Any]:
        return self._chunk([ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content=text))])

    def finish(self, finish_reason: str) -> dict[str, Any]:
        choice = ChatCompletionStreamChoice(
            index=0, delta=DeltaMessage(), finish_reason=finish_reason
        )
        return self._chunk([choice])

    def usage(self, usage: UsageInfo) -> dict[str, Any]:
        return self._chunk([], usage)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    state.check_model(body.model)
    _reject_unsupported(body)
    continue_final = bool(body.continue_final_message)
    if continue_final and body.add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            "continue_final_message",
        )
    if continue_final and body.messages[-1].role != "assistant":
        raise bad_request(
            "continue_final_message needs an assistant message last", "continue_final_message"
        )
    add_generation_prompt = (
        not continue_final if body.add_generation_prompt is None else body.add_generation_prompt
    )
    messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
    prompt_ids = state.model.render_chat(
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
    )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens else body.max_tokens
    request_id = new_request_id("chatcmpl")
    plan = build_plan(state.model, body, prompt_ids, request_id=request_id, max_tokens=max_tokens)
    created = int(time.time())
    model_name = state.model.served_name
    events = state.generator.generate(plan)

    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return await respond(
        request,
        events,
        stream=bool(body.stream),
        fmt=_ChatChunks(request_id, created, model_name, include_usage),
        include_usage=include_usage,
        request_id=request_id,
        build_response=lambda result: ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                ChatCompletionChoice(
                    index=0,
                    message=AssistantMessage(content=result.text),
                    finish_reason=result.finish_reason,
                )
            ],
            usage=result.usage,
        ),
    )
