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

from services.gateway.errors import APIError, not_supported
from services.gateway.generate import Finished, GenerationEvent, TextDelta
from services.gateway.protocol import SamplingFields, UsageInfo
from services.gateway.sse import SSE_HEADERS, ChunkFormatter, event_stream, usage_info

logger = logging.getLogger("kvrelay.gateway")


def reject_unsupported_sampling(body: SamplingFields) -> None:
    if body.n is not None and body.n > 1:
        raise not_supported(f"n={body.n} (several choices per request)", "n")


@dataclass(frozen=True)
class Collected:
    text: str
    finish_reason: str
    usage: UsageInfo


async def _collect(events: AsyncGenerator[GenerationEvent, None]) -> Collected:
    parts: list[str] = []
    finished: Finished | None = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finished = event
    if finished is None:
        raise APIError(500, "generation ended without finishing")
    return Collected("".join(parts), finished.finish_reason, usage_info(finished))


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
