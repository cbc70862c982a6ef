"""Bearer API key on /v1/* (health checks stay open to load balancers)."""

from __future__ import annotations

import hmac
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.errors import AUTHENTICATION, APIError, error_response

logger = logging.getLogger("kvrelay.gateway")


class ApiKeyMiddleware:
    """Pure ASGI, so that it runs before the body is parsed and leaves `receive` alone."""

    def __init__(self, app: ASGIApp, api_key: str, protected_prefix: str = "/v1") -> None:
        self.app = app
        self._key = api_key.encode()
        self._prefix = protected_prefix

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Constant time, so that the key cannot be guessed a byte at a time.
        return hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        protected = path == self._prefix or path.startswith(self._prefix + "/")
        if not protected or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        err = APIError(
            401,
            "invalid or missing API key: send 'Authorization: Bearer <key>'",
            type=AUTHENTICATION,
            code="invalid_api_key",
        )
        logger.info("rejected %s %s: 401 %s", scope.get("method"), path, err.message)
        await error_response(err)(scope, receive, send)
