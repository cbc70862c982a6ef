"""Child processes of `kvrelay up` (and of the tests): start, wait until ready, stop by pid."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def grpc_serving(address: str, timeout_s: float = 1.0) -> bool:
    """True when the worker at host:port answers the standard health check SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def http_healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


class ChildProcessError(RuntimeError):
    pass


class ChildProcess:
    """A service process started by us and stopped by its own pid."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @classmethod
    def kvrelay(
        cls, name: str, args: Sequence[str], env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> ChildProcess:
        return cls(name, [sys.executable, "-m", "services.cli", *args], env, log_path)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ChildProcess:
        env = {**os.environ, **(self.env or {})}
        output: IO[bytes] | None = None
        if self.log_path is not None:
            self._log_file = output = open(self.log_path, "ab")  # noqa: SIM115 - kept open
        self.process = subprocess.Popen(
            self.argv, env=env, stdout=output, stderr=subprocess.STDOUT if output else None
        )
        log.debug("started %s (pid %d): %s", self.name, self.process.pid, " ".join(self.argv))
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ChildProcessError(f"{self.name} exited with code {self.returncode()}"
                                        f"{self._log_hint()}")
            if check():
                return
            time.sleep(0.2)
        raise ChildProcessError(f"{self.name} not ready after {timeout_s:.0f} s{self._log_hint()}")

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after the grace period; only ever this child's pid."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", self.name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""
