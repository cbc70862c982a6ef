"""A private redis-server (for `kvrelay up` and the tests): loopback, no persistence."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from services.processes import ChildProcess, free_port


class RedisServer:
    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = ChildProcess(
            "redis",
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            log_path=workdir / "redis.log",
        )

    def start(self) -> RedisServer:
        self.process.start()
        self.process.wait_ready(self.pings, timeout_s=20)
        return self

    def pings(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> None:
        """Same port, empty data: what a worker sees after a Redis restart."""
        self.stop()
        self.start()
