"""Server-sent events: OpenAI's `data: {json}` chunks, errors in-band, `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from pydantic import BaseModel

from services.gateway.errors import APIError
from services.gateway.generate import Finished, GenerationEvent, TextDelta
from services.gateway.logprobs import TokenLogprob
from services.gateway.protocol import PromptTokensDetails, UsageInfo

logger = logging.getLogger("kvrelay.gateway")

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies must not buffer tokens
}


def sse_data(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


def usage_info(finished: Sequence[Finished]) -> UsageInfo:
    """A request's usage from the Finished events of its choices: one prompt, n answers."""
    prompt_tokens = finished[0].prompt_tokens
    completion_tokens = sum(f.completion_tokens for f in finished)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished[0].cached_tokens),
    )


class ChunkFormatter(Protocol):
    """The endpoint-specific shape of each chunk (chat vs text completions)."""

    def opening(self) -> list[dict[str, Any]]: ...
    # `logprobs`: of the tokens whose text this is, when the request asked for them.
    def text(
        self, text: str, index: int, logprobs: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]: ...
    # `routed_experts`: the choice's, when the request asked for them.
    def finish(
        self, finish_reason: str, index: int, routed_experts: str | None = None
    ) -> dict[str, Any]: ...
    def usage(self, usage: UsageInfo) -> dict[str, Any]: ...


async def event_stream(
    events: AsyncGenerator[GenerationEvent, None],
    fmt: ChunkFormatter,
    *,
    include_usage: bool,
    request_id: str,
) -> AsyncIterator[str]:
    """Generation events -> SSE lines. A failure is an `error` event; [DONE] always ends it.

    When the client disconnects, Starlette cancels this generator; `aclosing` then closes
    the generation, whose `finally` cancels the worker calls.
    """
    async with aclosing(events):
        try:
            for chunk in fmt.opening():
                yield sse_data(chunk)
            finished: list[Finished] = []
            async for event in events:
                if isinstance(event, TextDelta):
                    yield sse_data(fmt.text(event.text, event.index, event.logprobs))
                elif isinstance(event, Finished):
                    yield sse_data(
                        fmt.finish(event.finish_reason, event.index, event.routed_experts)
                    )
                    finished.append(event)
            if include_usage and finished:
                # After every choice has finished: the whole request's usage, once.
                yield sse_data(fmt.usage(usage_info(finished)))
        except asyncio.CancelledError:
            logger.info("%s: stream cancelled (client gone or shutdown)", request_id)
            raise
        except APIError as err:
            logger.error("%s failed: %d %s", request_id, err.status, err.message)
            yield sse_data(err.body())
        except Exception as exc:
            logger.exception("%s failed", request_id)
            yield sse_data(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body())
    yield DONE
