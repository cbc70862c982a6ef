"""OpenAI-shaped errors and the handlers that turn every failure into one."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.protocol import ErrorResponse

logger = logging.getLogger("kvrelay.gateway")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    """An error to report to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        if type is None:
            type = INVALID_REQUEST if status < 500 else SERVER_ERROR
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_supported(what: str, param: str | None = None) -> APIError:
    return APIError(400, f"{what} is not supported yet", param=param, code="not_supported")


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Overload answers tell clients when to come back instead of hammering a full cluster.
RETRY_AFTER_S = 1


def error_response(err: APIError) -> JSONResponse:
    headers: dict[str, str] | None = None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif err.status in (429, 503):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _log_rejection(request: Request, err: APIError) -> None:
    if err.status < 500:
        logger.info(
            "rejected %s %s: %d %s", request.method, request.url.path, err.status, err.message
        )
    else:
        logger.error(
            "failed %s %s: %d %s", request.method, request.url.path, err.status, err.message
        )


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union in the error location: 'str', 'list[int]'..."""
    if not isinstance(part, str):
        return False
    return (
        part in _TYPE_TAGS
        or "[" in part
        or part.startswith(("constrained-", "function-", "lax-", "json-"))
    )


def _path(loc: list[Any]) -> str:
    return ".".join(str(p) for p in loc if p != "body" and not _is_union_tag(p))


def _format_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One readable message out of pydantic's error list, plus the first bad field."""
    # FastAPI prefixes locations with "body"; the client only knows its own field names.
    groups: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            detail = f": {ctx['error']}" if ctx.get("error") else ""
            return f"request body is not valid JSON{detail}", None
        top = _path(loc[:1]) if loc else ""
        groups.setdefault(top, []).append({**err, "loc": loc})

    parts: list[str] = []
    first_param: str | None = None
    for group in groups.values():
        if len(group) > 1 and any(_is_union_tag(p) for e in group for p in e["loc"]):
            # One error per member of a union: keep the member that matched deepest.
            depth = max(len(e["loc"]) for e in group)
            group = [e for e in group if len(e["loc"]) == depth]
            # A wrong value beats "not a string"/"not a list" from the members it is not.
            specific = [e for e in group if not str(e.get("type", "")).endswith("_type")]
            group = specific or group
            msgs = list(dict.fromkeys(str(e.get("msg")) for e in group))
            group = [{**group[0], "msg": " or ".join(msgs)}]
        for err in group:
            path = _path(err["loc"])
            if first_param is None and path:
                first_param = path
            if err.get("type") == "missing" and not path:
                parts.append("request body is missing")
            else:
                parts.append(f"{path or 'request body'}: {err.get('msg')}")
    return "; ".join(parts[:5]) or "invalid request", first_param


# The error answers of the API routes, for /openapi.json.
OPENAPI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Invalid request: not JSON, a wrong type, a value out of range, "
        "an unsupported option, a prompt longer than the context",
    },
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (--api-key)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Body larger than --max-request-body-bytes"},
    503: {
        "model": ErrorResponse,
        "description": "No worker could take the request now (see Retry-After)",
    },
}


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body it validates; this API answers 400 instead."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # cached by FastAPI as app.openapi_schema: edited in place
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _document_400_not_422(app)

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        _log_rejection(request, exc)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _format_validation_errors(list(exc.errors()))
        err = bad_request(message, param)
        _log_rejection(request, err)
        return error_response(err)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err = APIError(404, f"no such endpoint: {request.url.path}", type=NOT_FOUND)
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        _log_rejection(request, err)
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        return error_response(err)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
