"""Workers announce where their /metrics are, in Redis, for `kvrelay status` to find them.

    <prefix>endpoint:<worker_id>   HASH  WorkerEndpoint fields, PEXPIRE ttl: present = alive

Both roles announce (the prefix index's liveness keys know prefill workers only). A thread
beats the key every ttl / 3; a worker that dies drops out after the TTL. Redis being away
is not the worker's problem: the announcer keeps trying quietly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared.prefix_index.schema import DEFAULT_KEY_PREFIX

log = logging.getLogger(__name__)

ENDPOINT_TTL_S = 15.0


def endpoint_key(worker_id: str, prefix: str = DEFAULT_KEY_PREFIX) -> str:
    return f"{prefix}endpoint:{worker_id}"


@dataclass(frozen=True)
class WorkerEndpoint:
    worker_id: str
    role: str  # "prefill" or "decode"
    grpc_address: str  # host:port
    metrics_url: str = ""  # empty: the worker serves no /metrics
    started_at: float = 0.0  # Unix time

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, str]) -> WorkerEndpoint:
        values = {_text(k): _text(v) for k, v in fields.items()}
        return cls(
            worker_id=values.get("worker_id", ""),
            role=values.get("role", ""),
            grpc_address=values.get("grpc_address", ""),
            metrics_url=values.get("metrics_url", ""),
            started_at=float(values.get("started_at") or 0.0),
        )


class EndpointAnnouncer:
    def __init__(
        self,
        redis_url: str,
        endpoint: WorkerEndpoint,
        *,
        ttl_s: float = ENDPOINT_TTL_S,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self.endpoint = endpoint
        self._client = redis.Redis.from_url(
            redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._key = endpoint_key(endpoint.worker_id, key_prefix)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._interval_s = ttl_s / 3
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endpoint-announcer", daemon=True)
        self._failing = False

    def start(self) -> EndpointAnnouncer:
        self._thread.start()
        return self

    def _beat(self) -> None:
        pipe = self._client.pipeline(transaction=True)
        fields: dict[Any, Any] = self.endpoint.to_fields()  # redis' stubs want wider types
        pipe.hset(self._key, mapping=fields)
        pipe.pexpire(self._key, self._ttl_ms)
        pipe.execute()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._beat()
                if self._failing:
                    log.info("announcing /metrics in Redis again")
                self._failing = False
            except (redis.RedisError, OSError) as exc:
                if not self._failing:
                    log.warning("cannot announce /metrics in Redis (will retry): %s", exc)
                self._failing = True
            self._closing.wait(self._interval_s)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError, OSError):  # it expires anyway
            self._client.delete(self._key)
        self._client.close()


def read_endpoints(
    client: redis.Redis, key_prefix: str = DEFAULT_KEY_PREFIX
) -> list[WorkerEndpoint]:
    """Every announced worker, by worker id."""
    keys = sorted(client.scan_iter(match=endpoint_key("*", key_prefix), count=1000))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    found = [WorkerEndpoint.from_fields(fields) for fields in pipe.execute() if fields]
    return sorted(found, key=lambda e: (e.role, e.worker_id))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def uptime_s(endpoint: WorkerEndpoint) -> float:
    return max(time.time() - endpoint.started_at, 0.0) if endpoint.started_at else 0.0
