"""POST /v1/completions (text in, text out: no chat template)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from services.gateway.errors import not_supported
from services.gateway.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from services.gateway.routes_common import (
    reject_unsupported_sampling,
    respond,
)
from services.gateway.sampling import build_plan, new_request_id
from services.gateway.state import GatewayState, get_state

router = APIRouter()


def _reject_unsupported(body: CompletionRequest) -> None:
    reject_unsupported_sampling(body)
    if body.logprobs is not None:
        raise not_supported("logprobs", "logprobs")
    if body.echo:
        raise not_supported("echo", "echo")
    if body.suffix:
        raise not_supported("suffix", "suffix")
    if body.best_of is not None and body.best_of > 1:
        raise not_supported(f"best_of={body.best_of}", "best_of")


def _prompt_token_ids(state: GatewayState, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return state.model.encode_prompt(prompt)
    if prompt and isinstance(prompt[0], (str, list)):
        # A batch of prompts; a batch of one is just that prompt.
        if len(prompt) > 1:
            raise not_supported(f"a batch of {len(prompt)} prompts", "prompt")
        only = prompt[0]
        if isinstance(only, str):
            return state.model.encode_prompt(only)
        ids = list(only)
    else:
        ids = [int(t) for t in prompt if isinstance(t, int)]
    state.model.check_token_ids(ids, "prompt")
    return ids


class _CompletionChunks:
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._id = request_id
        self._created = created
        self._model = model
        self._include_usage = include_usage

    def _chunk(
        self, choices: list[CompletionChoice], usage: UsageInfo | None = None
    ) -> dict[str, Any]:
        data = CompletionChunk(
            id=self._id, created=self._created, model=self._model, choices=choices, usage=usage
        ).model_dump(mode="json")
        if not self._include_usage:
            del data["usage"]
        return data

    def opening(self) -> list[dict[str, Any]]:
        return []  # text completions have no role chunk

    def text(self, text: str) -> dict[str, Any]:
        return self._chunk([CompletionChoice(index=0, text=text, finish_reason=None)])

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk([CompletionChoice(index=0, text="", finish_reason=finish_reason)])

    def usage(self, usage: UsageInfo) -> dict[str, Any]:
        return self._chunk([], usage)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    state.check_model(body.model)
    _reject_unsupported(body)
    prompt_ids = _prompt_token_ids(state, body)
    request_id = new_request_id("cmpl")
    plan = build_plan(
        state.model, body, prompt_ids, request_id=request_id, max_tokens=body.max_tokens
    )
    created = int(time.time())
    model_name = state.model.served_name
    events = state.generator.generate(plan)

    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return await respond(
        request,
        events,
        stream=bool(body.stream),
        fmt=_CompletionChunks(request_id, created, model_name, include_usage),
        include_usage=include_usage,
        request_id=request_id,
        build_response=lambda result: CompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)
            ],
            usage=result.usage,
        ),
    )
