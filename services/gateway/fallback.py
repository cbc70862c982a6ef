"""--fallback-url: another OpenAI-compatible endpoint for the requests no pair can serve.

A request goes there when no healthy prefill/decode pair exists, or when every attempt
on a pair failed before anything reached the client (the generator's retries are spent).
The client's body is forwarded as sent (the model renamed with --fallback-model), with the
fallback's own key (--fallback-api-key; the client's key is not passed on), and the
answer comes back as the fallback gave it, streamed or whole, marked `X-Kvrelay-Fallback`.
Errors that are the client's (4xx) or the gateway's shutdown never fall back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import httpx
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from services.gateway.errors import UNAVAILABLE, APIError, error_response

logger = logging.getLogger("kvrelay.gateway")

FALLBACK_HEADER = "X-Kvrelay-Fallback"
CONNECT_TIMEOUT_S = 5.0
_PASSED_HEADERS = ("content-type", "cache-control", "x-request-id", "retry-after")

E = TypeVar("E")


def _needs_fallback(error: APIError) -> bool:
    """Workers unavailable, lost or full: another endpoint may well answer."""
    return error.status == 503 and error.code != "shutdown"


class Fallback:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/v1")  # accept OpenAI's base_url style too
        self._api_key = api_key
        self._model = model
        self._timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.forwarded = 0

    def _client_here(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(timeout=self._timeout)
            self._loop = loop
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    async def first_or_forward(
        self, request: Request, events: AsyncGenerator[E, None], *, pairs_ready: bool
    ) -> AsyncGenerator[E, None] | Response:
        """The generation with its first event already there, or the fallback's answer.

        Waiting for the first event is where a request fails over: until then nothing has
        reached the client. A client that leaves meanwhile cancels the generation.
        """
        if not pairs_ready:
            await events.aclose()
            return await self.forward(request, "no healthy prefill/decode pair")
        first = asyncio.ensure_future(anext(events))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, APIError):
                await first
            await events.aclose()
            return Response(status_code=499)  # client gone; nobody reads this
        try:
            head = first.result()
        except StopAsyncIteration:
            return _empty()
        except APIError as exc:
            if not _needs_fallback(exc):
                raise
            return await self.forward(request, exc.message)
        return _chain(head, events)

    async def forward(self, request: Request, reason: str) -> Response:
        body = await self._body(request)
        url = f"{self.base_url}{request.url.path}"
        headers = {"content-type": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        request_id = request.headers.get("x-request-id")
        if request_id:
            headers["x-request-id"] = request_id
        self.forwarded += 1
        logger.warning(
            "%s %s: to the fallback %s (%s)",
            request.method,
            request.url.path,
            self.base_url,
            reason,
        )
        client = self._client_here()
        try:
            upstream = await client.send(
                client.build_request("POST", url, content=body, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            err = APIError(
                503,
                f"no worker could serve the request ({reason}), and the "
                f"fallback failed: {type(exc).__name__}",
                type=UNAVAILABLE,
                code="fallback_unavailable",
            )
            return error_response(err)
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in _PASSED_HEADERS}
        passed[FALLBACK_HEADER] = "1"
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                _relay(upstream), status_code=upstream.status_code, headers=passed
            )
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            err = APIError(
                503,
                f"the fallback broke off its answer: {type(exc).__name__}",
                type=UNAVAILABLE,
                code="fallback_unavailable",
            )
            return error_response(err)
        finally:
            await upstream.aclose()
        return Response(content, status_code=upstream.status_code, headers=passed)

    async def _body(self, request: Request) -> bytes:
        raw = await request.body()  # cached: FastAPI read it to validate
        if not self._model:
            return raw
        data: dict[str, Any] = json.loads(raw)
        data["model"] = self._model
        return json.dumps(data).encode()


async def _disconnected(request: Request) -> None:
    # The body has been read already, so the next message can only be a disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chain(head: E, rest: AsyncGenerator[E, None]) -> AsyncGenerator[E, None]:
    async with contextlib.aclosing(rest):
        yield head
        async for event in rest:
            yield event


async def _empty() -> AsyncGenerator[Any, None]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        # The fallback broke off mid-stream: end the SSE stream with an error event.
        err = APIError(
            503,
            f"the fallback broke off its answer: {type(exc).__name__}",
            type=UNAVAILABLE,
            code="fallback_unavailable",
        )
        yield f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n".encode()
    finally:
        await upstream.aclose()
