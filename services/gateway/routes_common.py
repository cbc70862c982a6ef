"""Helpers shared by the chat and text completion endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from services.gateway.errors import APIError, bad_request
from services.gateway.fallback import Fallback
from services.gateway.generate import Finished, GenerationEvent, TextDelta
from services.gateway.logprobs import TokenLogprob
from services.gateway.protocol import SamplingFields, UsageInfo
from services.gateway.sse import SSE_HEADERS, ChunkFormatter, event_stream, usage_info
from services.gateway.state import get_state

logger = logging.getLogger("kvrelay.gateway")


def reject_unsupported_sampling(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        # As OpenAI's API: options of a stream make no sense without one.
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


@dataclass(frozen=True)
class CollectedChoice:
    index: int
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()  # when the request asked for them
    routed_experts: str | None = None  # with return_routed_experts


@dataclass(frozen=True)
class Collected:
    choices: list[CollectedChoice]  # by index
    usage: UsageInfo


async def _collect(events: AsyncGenerator[GenerationEvent, None]) -> Collected:
    parts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    finished: dict[int, Finished] = {}
    async with aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                parts.setdefault(event.index, []).append(event.text)
                logprobs.setdefault(event.index, []).extend(event.logprobs)
            else:
                finished[event.index] = event
    if not finished:
        raise APIError(500, "generation ended without finishing")
    choices = [
        CollectedChoice(
            i,
            "".join(parts.get(i, [])),
            finished[i].finish_reason,
            tuple(logprobs.get(i, ())),
            finished[i].routed_experts,
        )
        for i in sorted(finished)
    ]
    return Collected(choices, usage_info(list(finished.values())))


class ClientGone(Exception):
    """The client hung up before its (non-streaming) answer was ready."""


async def collect_unless_disconnected(
    request: Request, events: AsyncGenerator[GenerationEvent, None]
) -> Collected:
    """The whole answer; cancels the generation (and so the worker calls) if the client leaves.

    Starlette only does that by itself for streaming responses.
    """
    work = asyncio.ensure_future(_collect(events))
    gone = asyncio.Event()

    async def watch() -> None:
        # The body has been read already, so the next message can only be a disconnect.
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                work.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone.is_set():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not work.done():
            work.cancel()


async def respond(
    request: Request,
    events: AsyncGenerator[GenerationEvent, None],
    *,
    stream: bool,
    fmt: ChunkFormatter,
    include_usage: bool,
    request_id: str,
    build_response: Callable[[Collected], BaseModel],
) -> Response:
    """An SSE stream of the generation, or its whole answer as one JSON body."""
    fallback: Fallback | None = getattr(request.app.state, "fallback", None)
    if fallback is not None:
        # Failing over is possible until the first output: wait for it before answering.
        ready = get_state(request).pool.report().ready
        outcome = await fallback.first_or_forward(request, events, pairs_ready=ready)
        if isinstance(outcome, Response):
            return outcome
        events = outcome
    if stream:
        return StreamingResponse(
            event_stream(events, fmt, include_usage=include_usage, request_id=request_id),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        result = await collect_unless_disconnected(request, events)
    except ClientGone:
        logger.info("%s: client gone before the answer; cancelled", request_id)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return JSONResponse(build_response(result).model_dump(mode="json"))
