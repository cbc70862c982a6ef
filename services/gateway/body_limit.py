"""413 for request bodies over the limit, before anything parses them.

A declared Content-Length over the limit is refused without reading the body; a chunked
body (no Content-Length) is read up to the limit and refused as soon as it passes it.
Pure ASGI, like the API key check: Starlette's own limiter answers in plain text on some
paths, and every error here has OpenAI's JSON shape.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import APIError, error_response

logger = logging.getLogger("kvrelay.gateway")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses such a request before we see it
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        err = APIError(
            413,
            f"the request body ({size}) is larger than this server's limit of "
            f"{self.max_bytes} bytes",
            code="request_too_large",
        )
        logger.info("rejected %s %s: 413 %s", scope.get("method"), scope.get("path"), err.message)
        await error_response(err)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return

        # Read the whole body here (the JSON parser would anyway), counting as it comes.
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nothing to answer
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"over {self.max_bytes} bytes")
                return
            parts.append(part)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            # The body once, then the real channel (a disconnect, for streaming answers).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
