"""The request id: one per client request, on every log line about it, in every service.

The gateway takes it from the client's X-Request-Id header (or makes one) and keeps it in
a context variable for the request's task. It travels to the workers twice: as gRPC
metadata (`x-request-id`), which a worker's handler binds to its own task, and inside the
wire request id of the gRPC messages (`<request id>/<gateway's id>`), which the engine
threads and the KV channel know the request by. The wire id stays unique even when a client
sends the same X-Request-Id twice.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar
from typing import Any

REQUEST_ID_HEADER = "x-request-id"  # HTTP header and gRPC metadata key (lower case)
MAX_REQUEST_ID_LENGTH = 128

_request_id: ContextVar[str | None] = ContextVar("kvrelay_request_id", default=None)
# When the current worker call started (time.perf_counter()), for its queue time.
_call_started: ContextVar[float | None] = ContextVar("kvrelay_call_started", default=None)


def valid_request_id(value: str) -> bool:
    """Printable ASCII, 1 to 128 characters: safe in headers, gRPC metadata and log lines."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and all(" " <= c <= "~" for c in value)


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> None:
    """Binds `value` to the current task (and the tasks it starts from now on)."""
    _request_id.set(value)


def grpc_metadata() -> tuple[tuple[str, str], ...] | None:
    """Metadata for a worker call made on behalf of the current request (None: no request)."""
    request_id = _request_id.get()
    return None if request_id is None else ((REQUEST_ID_HEADER, request_id),)


def traced_request_id(wire_id: str) -> str:
    """The id a worker call carries in its message: the request id, then the caller's own."""
    request_id = _request_id.get()
    if request_id is None or wire_id == request_id or wire_id.startswith(request_id + "/"):
        return wire_id
    return f"{request_id}/{wire_id}"


def bind_grpc_call(context: Any, wire_id: str = "") -> str:
    """In a worker's gRPC handler: binds the caller's request id (else the wire id) to this
    call's task, and notes when the call started. Returns the bound id."""
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and valid_request_id(value):
            request_id = value
    request_id = request_id or wire_id
    _request_id.set(request_id or None)
    _call_started.set(time.perf_counter())
    return request_id


def seconds_since_call_started() -> float | None:
    started = _call_started.get()
    return None if started is None else time.perf_counter() - started


def request_log_extra(wire_id: str) -> dict[str, str]:
    """`extra` for a log call about a request, made outside its task (an engine thread):
    the request id that leads the wire id."""
    return {"request_id": wire_id.rsplit("/", 1)[0]}
