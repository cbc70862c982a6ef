"""The gateway's outermost ASGI middleware: the request id, and the request's metrics.

- X-Request-Id: taken from the request when valid (printable ASCII, at most 128
  characters; otherwise a 400 in OpenAI's error shape), else made here; bound to the
  request's task for the logs and the worker calls, and returned as a response header.
- Metrics: requests by endpoint and status, generation requests in progress, and the
  request's timings (shared/observability/request_metrics.py) once its last byte is sent.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from shared.observability.request_id import (
    MAX_REQUEST_ID_LENGTH,
    REQUEST_ID_HEADER,
    new_request_id,
    set_request_id,
    valid_request_id,
)
from shared.observability.request_metrics import (
    RequestMetrics,
    RequestObservation,
    start_observation,
)

logger = logging.getLogger("kvrelay.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class EndpointNames:
    """Request path -> the app's path template it matches ("other" if none): label values
    stay bounded whatever paths clients send."""

    def __init__(self, templates: Callable[[], Iterable[str]]) -> None:
        self._templates = templates
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    def __call__(self, path: str) -> str:
        if self._patterns is None:  # the app's routes are all there by the first request
            self._patterns = [
                (re.compile(re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(t)) + "$"), t)
                for t in self._templates()
            ]
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return "other"


class RequestObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: RequestMetrics, endpoints: EndpointNames) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = given if given is not None and valid_request_id(given) else new_request_id()
        set_request_id(request_id)
        generation = scope.get("path") in GENERATION_PATHS
        observation = RequestObservation(
            endpoint=self.endpoints(scope.get("path", "")),
            generation=generation,
            metrics=self.metrics,
            arrived=arrived,
        )
        start_observation(observation)
        status = 500  # unless a response starts: an exception escaped the app

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        if given is not None and request_id != given:
            status = 400
            await _bad_request_id(send_with_id)
            self.metrics.record(observation, status)
            return
        if generation:
            self.metrics.running.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if generation:
                self.metrics.running.dec()
            self.metrics.record(observation, status)
            if generation:
                logger.info(
                    "%s %s %d: %d prompt tokens (%d cached), %d output tokens, TTFT %s, %.3f s",
                    scope.get("method", "?"),
                    scope.get("path", "?"),
                    status,
                    observation.prompt_tokens,
                    observation.cached_tokens,
                    observation.completion_tokens,
                    "-"
                    if observation.first_text_at is None
                    else f"{observation.first_text_at - arrived:.3f} s",
                    time.perf_counter() - arrived,
                )


async def _bad_request_id(send: Send) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"X-Request-Id must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII "
                "characters",
                "type": "invalid_request_error",
                "param": "X-Request-Id",
                "code": "invalid_request_id",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
