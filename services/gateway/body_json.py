"""Treats the body of POST /v1/* as JSON whatever its content type says.

`curl -d '{...}'` sends application/x-www-form-urlencoded; OpenAI's API (and other
servers) read the JSON anyway, whereas FastAPI would ignore a non-JSON body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class JsonBodyMiddleware:
    def __init__(self, app: ASGIApp, prefix: str = "/v1/") -> None:
        self.app = app
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and scope.get("path", "").startswith(self._prefix)
        ):
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)
