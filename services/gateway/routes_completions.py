"""POST /v1/completions (text in, text out: no chat template)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request, Response

from services.gateway.errors import OPENAPI_ERRORS, not_supported
from services.gateway.logprobs import (
    CompletionLogprobBuilder,
    TokenBytes,
    TokenLogprob,
    token_bytes_for,
)
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
    if body.echo and body.logprobs is not None:
        # The prompt's own logprobs would need every position's logits from prefill.
        raise not_supported("echo together with logprobs", "echo")
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
    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
        *,
        n: int = 1,
        echo: str = "",  # the prompt's text, sent first in each choice
        token_bytes: TokenBytes | None = None,  # set when the request asked for logprobs
    ) -> None:
        self._id = request_id
        self._created = created
        self._model = model
        self._include_usage = include_usage
        self._n = n
        self._echo = echo
        self._token_bytes = token_bytes
        self._logprobs: dict[int, CompletionLogprobBuilder] = {}

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
        # Text completions have no role chunk; an echoed prompt comes first.
        if not self._echo:
            return []
        return [
            self._chunk([CompletionChoice(index=i, text=self._echo, finish_reason=None)])
            for i in range(self._n)
        ]

    def text(self, text: str, index: int, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice = CompletionChoice(index=index, text=text, finish_reason=None)
        if self._token_bytes is not None:
            builder = self._logprobs.setdefault(index, CompletionLogprobBuilder(self._token_bytes))
            choice.logprobs = builder.build(logprobs)
        return self._chunk([choice])

    def finish(
        self, finish_reason: str, index: int, routed_experts: str | None = None
    ) -> dict[str, Any]:
        choice = CompletionChoice(
            index=index, text="", finish_reason=finish_reason, routed_experts=routed_experts
        )
        return self._chunk([choice])

    def usage(self, usage: UsageInfo) -> dict[str, Any]:
        return self._chunk([], usage)


@router.post("/v1/completions", response_model=None, responses=OPENAPI_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    state.check_model(body.model)
    _reject_unsupported(body)
    prompt_ids = _prompt_token_ids(state, body)
    request_id = new_request_id("cmpl")
    plan = build_plan(
        state.model,
        body,
        prompt_ids,
        request_id=request_id,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )
    echo = _echo_text(state, body, prompt_ids)
    token_bytes = token_bytes_for(state.model.tokenizer) if body.logprobs is not None else None
    created = int(time.time())
    model_name = state.model.served_name
    if body.model and state.model.adapter_for(body.model):
        model_name = body.model  # an adapter answers under the name the request gave it
    events = state.generator.generate(plan)

    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return await respond(
        request,
        events,
        stream=bool(body.stream),
        fmt=_CompletionChunks(
            request_id,
            created,
            model_name,
            include_usage,
            n=plan.n,
            echo=echo,
            token_bytes=token_bytes,
        ),
        include_usage=include_usage,
        request_id=request_id,
        build_response=lambda result: CompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=echo + c.text,
                    finish_reason=c.finish_reason,
                    logprobs=(
                        CompletionLogprobBuilder(token_bytes).build(c.logprobs)
                        if token_bytes is not None
                        else None
                    ),
                    routed_experts=c.routed_experts,
                )
                for c in result.choices
            ],
            usage=result.usage,
        ),
    )


def _echo_text(state: GatewayState, body: CompletionRequest, prompt_ids: list[int]) -> str:
    """The prompt as the client sent it (its text, or its token ids decoded), with echo."""
    if not body.echo:
        return ""
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str):
        return prompt[0]
    text = state.model.tokenizer.decode(prompt_ids)
    return text if isinstance(text, str) else ""
