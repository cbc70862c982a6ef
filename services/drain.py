"""Graceful drain of a worker at SIGTERM: stop taking calls, finish those in flight.

The interceptor counts the worker's calls in flight. Once `start()` is called it refuses
new ones with UNAVAILABLE and details starting with DRAINING, which the gateway reads as
"route elsewhere" without giving up on the calls still running here (a worker that
fails does get its calls abandoned). Health checks stay open: they say NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio

from services.auth_interceptor import HEALTH_METHOD_PREFIX, refusing_handler

log = logging.getLogger(__name__)

DRAINING = "draining:"  # leads the details of a call refused by a draining worker


def is_draining(details: str | None) -> bool:
    return bool(details) and str(details).startswith(DRAINING)


class DrainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, worker_id: str, open_prefixes: Sequence[str] = (HEALTH_METHOD_PREFIX,)
    ) -> None:
        self.worker_id = worker_id
        self.draining = False
        self.in_flight = 0
        self._open_prefixes = tuple(open_prefixes)
        self._idle: asyncio.Event | None = None

    def start(self) -> None:
        """From now on every new call is refused."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight; False if some still are after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(left, 0.5))
        return True

    def _enter(self) -> None:
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        if self.draining:
            return refusing_handler(
                handler,
                grpc.StatusCode.UNAVAILABLE,
                f"{DRAINING} worker {self.worker_id} is shutting down",
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._counted(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._counted_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no streaming requests in this service

    def _counted(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        return run

    def _counted_stream(
        self, behavior: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncGenerator[Any, None]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            self._enter()
            try:
                # aclosing: a call cancelled while a message goes out still runs the
                # handler's own cleanup (decode frees its pages) before it counts as done.
                async with aclosing(behavior(request, context)) as items:
                    async for item in items:
                        yield item
            finally:
                self._leave()

        return run
