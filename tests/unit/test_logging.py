"""Log lines carry the request id; --log-format json; the gateway's X-Request-Id handling."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.cli import build_parser
from shared.observability.http import EndpointNames, RequestObservabilityMiddleware
from shared.observability.logs import configure_logging
from shared.observability.request_id import (
    current_request_id,
    grpc_metadata,
    request_log_extra,
    set_request_id,
    traced_request_id,
    valid_request_id,
)
from shared.observability.request_metrics import RequestMetrics

log = logging.getLogger("kvrelay.test")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers: put pytest's back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    own_levels = {name: logging.getLogger(name).level for name in ("kvrelay", "services")}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, own in own_levels.items():
            logging.getLogger(name).setLevel(own)


def in_request(request_id: str | None, fn: object) -> None:
    """Runs fn in a fresh context bound to request_id, as a request's task would."""

    def run() -> None:
        set_request_id(request_id)
        fn()  # type: ignore[operator]

    contextvars.copy_context().run(run)


def test_json_lines_carry_the_request_id(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", service="gateway", stream=out)
    in_request("req-1", lambda: log.info("prefill of %d tokens", 40))
    log.info("not about a request")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        in_request("req-2", lambda: log.exception("failed"))
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "prefill of 40 tokens"
    assert (first["request_id"], first["level"], first["logger"]) == (
        "req-1",
        "INFO",
        "kvrelay.test",
    )
    assert first["service"] == "gateway" and first["time"].endswith("+00:00")
    assert "request_id" not in second
    assert third["request_id"] == "req-2" and "RuntimeError: boom" in third["exception"]


def test_text_lines_show_the_request_id_in_brackets(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    in_request("abc-123", lambda: log.info("hello"))
    log.info("plain")
    # An engine thread names the request itself: the id that leads its wire id.
    log.info("engine line", extra=request_log_extra("abc-123/cmpl-9f"))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("INFO [kvrelay.test] [abc-123] hello")
    assert lines[1].endswith("INFO [kvrelay.test] plain")
    assert lines[2].endswith("INFO [kvrelay.test] [abc-123] engine line")


def test_debug_reaches_our_loggers_only(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("debug", "text", stream=out)
    log.debug("ours")
    logging.getLogger("grpc.some_library").debug("theirs")
    logging.getLogger("grpc.some_library").info("theirs at info")
    text = out.getvalue()
    assert "ours" in text and "theirs at info" in text and "theirs\n" not in text
    with pytest.raises(ValueError):
        configure_logging("loud", "text", stream=out)
    with pytest.raises(ValueError):
        configure_logging("info", "xml", stream=out)


def test_log_flags_on_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for command in (["prefill"], ["decode"], ["up"], ["status"]):
        args = build_parser().parse_args([*command, "--log-format", "json", "--log-level", "debug"])
        assert (args.log_format, args.log_level) == ("json", "debug")
    monkeypatch.setenv("KVRELAY_LOG_FORMAT", "json")
    monkeypatch.setenv("KVRELAY_METRICS_PORT", "9400")
    args = build_parser().parse_args(["decode"])
    assert (args.log_format, args.metrics_port) == ("json", 9400)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["decode", "--log-format", "xml"])


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("test-abc-123", True),
        ("a" * 128, True),
        ("with space/and:punct", True),
        ("", False),
        ("a" * 129, False),
        ("tab\there", False),
        ("caf\u00e9", False),
        ("new\nline", False),
    ],
)
def test_valid_request_ids(value: str, valid: bool) -> None:
    assert valid_request_id(value) is valid


def test_wire_ids_lead_with_the_request_id() -> None:
    def check() -> None:
        assert current_request_id() is None and grpc_metadata() is None
        assert traced_request_id("cmpl-1") == "cmpl-1"  # outside a request: unchanged
        set_request_id("client/id")
        assert grpc_metadata() == (("x-request-id", "client/id"),)
        assert traced_request_id("cmpl-1") == "client/id/cmpl-1"
        assert traced_request_id("client/id/cmpl-1-2") == "client/id/cmpl-1-2"  # once only
        assert request_log_extra("client/id/cmpl-1-2") == {"request_id": "client/id"}
        assert request_log_extra("cmpl-1") == {"request_id": "cmpl-1"}

    contextvars.copy_context().run(check)


def _app(registry: CollectorRegistry) -> tuple[FastAPI, RequestMetrics]:
    app = FastAPI()
    metrics = RequestMetrics(registry)

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, str | None]:
        log.info("looking up %s", model_id)
        return {"id": model_id, "request_id": current_request_id()}

    app.add_middleware(
        RequestObservabilityMiddleware,
        metrics=metrics,
        endpoints=EndpointNames(lambda: app.openapi()["paths"]),
    )
    return app, metrics


def test_middleware_takes_makes_and_returns_the_request_id(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    registry = CollectorRegistry()
    app, _ = _app(registry)

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return [
                await client.get("/v1/models/m1", headers={"X-Request-Id": "test-abc-123"}),
                await client.get("/v1/models/m2"),
                await client.get("/v1/models/m3", headers={"X-Request-Id": "x" * 129}),
                await client.get("/nowhere"),
            ]

    given, made, bad, missing = asyncio.run(calls())
    assert given.headers["x-request-id"] == "test-abc-123"
    assert given.json() == {"id": "m1", "request_id": "test-abc-123"}
    assert made.headers["x-request-id"] == made.json()["request_id"]
    assert valid_request_id(made.headers["x-request-id"])
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "X-Request-Id"
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert bad.headers["x-request-id"] != "x" * 129
    assert missing.status_code == 404
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    looked_up = {line["message"]: line.get("request_id") for line in lines}
    assert looked_up["looking up m1"] == "test-abc-123"
    assert looked_up["looking up m2"] == made.headers["x-request-id"]

    def count(endpoint: str, status: str) -> float | None:
        labels = {"endpoint": endpoint, "status": status}
        return registry.get_sample_value("kvrelay_requests_total", labels)

    assert count("/v1/models/{model_id}", "200") == 2
    assert count("/v1/models/{model_id}", "400") == 1
    assert count("other", "404") == 1
