"""The internal token on the workers' gRPC: calls without it are refused (UNAUTHENTICATED).

Callers (the gateway, tools) send `authorization: Bearer <token>` metadata; the token
comes from --internal-token / KVRELAY_INTERNAL_TOKEN (`kvrelay up` makes one and hands it
to its children through the environment, never on a command line).

Health checks stay open: load balancers, `kvrelay status` and the container health
checks probe them without secrets, and they reveal nothing but SERVING / NOT_SERVING.
Every kvrelay call (Prefill, Generate, GetInfo) is guarded.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a caller adds to every worker call (none without a token)."""
    return ((AUTH_METADATA_KEY, bearer(token)),) if token else ()


def refusing_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends every call with `code`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, details)
        yield  # pragma: no cover - never reached; makes this an async generator

    # The request is never read: no deserializer, so a malformed one costs nothing.
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, response_serializer=handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, open_prefixes: Sequence[str] = (HEALTH_METHOD_PREFIX,)) -> None:
        if not token:
            raise ValueError("the internal token is empty")
        self._expected = bearer(token).encode()
        self._open_prefixes = tuple(open_prefixes)
        self._refusals = 0

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
                break
        # Constant time: the token cannot be guessed a byte at a time.
        return hmac.compare_digest(presented, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._authorized(metadata):
            return handler
        self._refusals += 1
        if self._refusals == 1 or self._refusals % 100 == 0:
            # Never the presented value: it may be a near miss of the real token.
            log.warning(
                "refused %s without the right internal token (%d refused so far)",
                method,
                self._refusals,
            )
        return refusing_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token"
        )
