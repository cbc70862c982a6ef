"""Logging of every kvrelay command: `--log-level`, `--log-format text|json`, request ids.

A filter on the handler puts the current request id (shared/observability/request_id.py)
on every record as `request_id`; the text format shows it in brackets after the logger's
name, the JSON format as a field. A record may also bring its own (`extra={"request_id":
...}`), for code that runs outside the request's task.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

from shared.observability.request_id import current_request_id

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(request_tag)s%(message)s"
# Our own code logs below INFO when asked; libraries (grpc, asyncio, httpx) stay at INFO.
OWN_LOGGERS = ("kvrelay", "services", "shared", "loadtest")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f"[{request_id}] " if request_id else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if self.service:
            entry["service"] = self.service
        entry["pid"] = self.pid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(fmt: str, service: str | None = None) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(service)
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}; choose from {LOG_FORMATS}")


def configure_logging(
    level: str = "info",
    fmt: str = "text",
    *,
    service: str | None = None,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Replaces the root logger's handlers with one that writes `fmt` lines to `stream`."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; choose from {LOG_LEVELS}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt, service))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.INFO))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    return handler
