"""deploy/healthcheck.py (the images' `kvrelay-healthcheck`) against real servers."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.healthcheck import probe_from_container
from services.processes import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def run_probe(*args: str) -> int:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          timeout=30).returncode


@pytest.fixture
def grpc_health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_grpc_probe_follows_the_serving_status(
    grpc_health_server: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = grpc_health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_probe("grpc", address) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_probe("grpc", address) == 1


def test_probes_fail_when_nothing_listens() -> None:
    port = free_port()
    assert run_probe("grpc", f"127.0.0.1:{port}") == 1
    assert run_probe("http", f"http://127.0.0.1:{port}/health") == 1


def test_http_probe_needs_a_200(http_server: str) -> None:
    assert run_probe("http", f"{http_server}/health") == 0
    assert run_probe("http", f"{http_server}/other") == 1


def test_without_arguments_it_probes_the_containers_own_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KVRELAY_PORT", raising=False)
    assert probe_from_container(["/opt/kvrelay/venv/bin/kvrelay", "gateway"]) == (
        "http", "http://127.0.0.1:30000/health")
    assert probe_from_container(["kvrelay", "up", "--port", "8080"]) == (
        "http", "http://127.0.0.1:8080/health")
    assert isinstance(probe_from_container(["kvrelay", "prefill"]), str)  # no fixed port
    monkeypatch.setenv("KVRELAY_PORT", "50051")
    assert probe_from_container(["kvrelay", "prefill"]) == ("grpc", "127.0.0.1:50051")
    assert probe_from_container(["kvrelay", "decode", "--port=50052"]) == (
        "grpc", "127.0.0.1:50052")
    assert isinstance(probe_from_container(["redis-server"]), str)
