"""gRPC clients of the prefill and decode workers, and their health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth_interceptor import auth_metadata
from shared.rpc import kvrelay_pb2_grpc as pb_grpc

logger = logging.getLogger("kvrelay.gateway")

Role = Literal["prefill", "decode"]

_CHANNEL_OPTIONS = [
    # Prompts of a long context are a few hundred KiB of token ids: stay clear of the 4 MiB cap.
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly to a worker that restarts, rather than backing off for minutes: until
    # the channel reconnects, calls to the worker fail at once even though it serves again.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
HEALTH_CHECK_TIMEOUT_S = 1.0
HEALTH_MAX_AGE_S = 1.0
# A worker last seen failing is tried again after this long even with no health check.
STALE_HEALTH_S = 5.0


class WorkerClient:
    """One worker: its channel (made on first use, in the running event loop) and health."""

    def __init__(
        self,
        addr: str,
        role: Role,
        internal_token: str | None = None,
        health_timeout_s: float = HEALTH_CHECK_TIMEOUT_S,
    ) -> None:
        self.addr = addr
        self.role = role
        self._auth = auth_metadata(internal_token)
        self.health_timeout_s = health_timeout_s
        self.healthy = True  # optimistic until a check says otherwise
        self.checked_at = 0.0  # time.monotonic() of the last verdict
        # Calls that need this worker (a prefill call needs its decode too): cancelled when
        # the worker fails, so that a cut link does not leave them waiting for the deadline.
        self._calls: set[grpc.aio.Call] = set()
        self.abandoned_at = float("-inf")  # time.monotonic() its calls were last cancelled
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefill_stub: pb_grpc.PrefillWorkerStub | None = None
        self._decode_stub: pb_grpc.DecodeWorkerStub | None = None
        self._health_stub: health_pb2_grpc.HealthStub | None = None

    def __repr__(self) -> str:
        return f"{self.role} worker {self.addr}"

    def _channel_here(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        # An aio channel belongs to the loop it was made in (tests run several loops).
        if self._channel is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.addr, options=_CHANNEL_OPTIONS)
            self._loop = loop
            self._prefill_stub = self._decode_stub = self._health_stub = None
        return self._channel

    def prefill_stub(self) -> pb_grpc.PrefillWorkerStub:
        channel = self._channel_here()
        if self._prefill_stub is None:
            self._prefill_stub = pb_grpc.PrefillWorkerStub(channel)
        return self._prefill_stub

    def decode_stub(self) -> pb_grpc.DecodeWorkerStub:
        channel = self._channel_here()
        if self._decode_stub is None:
            self._decode_stub = pb_grpc.DecodeWorkerStub(channel)
        return self._decode_stub

    def metadata(
        self, extra: tuple[tuple[str, str], ...] | None = None
    ) -> tuple[tuple[str, str], ...]:
        """Metadata of a call to this worker: the internal token, then `extra`."""
        return self._auth + (extra or ())

    def usable(self, now: float) -> bool:
        return self.healthy or now - self.checked_at > STALE_HEALTH_S

    def track(self, call: grpc.aio.Call) -> None:
        """Cancel `call` if this worker fails before the call is done."""
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    def _abandon_calls(self, reason: str) -> None:
        calls = [c for c in self._calls if not c.done()]
        if not calls:
            return
        self.abandoned_at = time.monotonic()
        logger.warning("%r: abandoning %d calls in flight (%s)", self, len(calls), reason)
        for call in calls:
            call.cancel()

    def mark_draining(self, reason: str) -> None:
        """The worker refuses new calls while it finishes those it has: route around it,
        but leave its calls in flight alone."""
        if self.healthy:
            logger.info("%r is draining: %s", self, reason)
        self.healthy = False
        self.checked_at = time.monotonic()

    def mark_failed(self, reason: str) -> None:
        if self.healthy:
            logger.warning("%r marked unhealthy: %s", self, reason)
        self.healthy = False
        self.checked_at = time.monotonic()
        self._abandon_calls(reason)

    async def check_health(self, timeout: float | None = None) -> bool:
        channel = self._channel_here()
        if self._health_stub is None:
            self._health_stub = health_pb2_grpc.HealthStub(channel)
        try:
            # "" is the server as a whole, which grpc's health servicer reports by default.
            resp = await self._health_stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=timeout or self.health_timeout_s,
            )
            ok = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            ok = False
            if self.healthy:
                logger.warning("%r failed its health check: %s", self, exc.code().name)
            # A cut link drops packets without a reset: calls on it would wait for their
            # deadline. The health check on the same channel is what notices.
            self._abandon_calls(f"health check {exc.code().name}")
        if ok and not self.healthy:
            logger.info("%r is healthy again", self)
        self.healthy = ok
        self.checked_at = time.monotonic()
        return ok

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close()


@dataclass(frozen=True)
class HealthReport:
    prefill: dict[str, bool]
    decode: dict[str, bool]

    @property
    def ready(self) -> bool:
        return any(self.prefill.values()) and any(self.decode.values())


class WorkerPool:
    def __init__(
        self,
        prefill_addrs: Sequence[str],
        decode_addrs: Sequence[str],
        *,
        internal_token: str | None = None,
        health_timeout_s: float = HEALTH_CHECK_TIMEOUT_S,
    ) -> None:
        self.prefill = [
            WorkerClient(a, "prefill", internal_token, health_timeout_s) for a in prefill_addrs
        ]
        self.decode = [
            WorkerClient(a, "decode", internal_token, health_timeout_s) for a in decode_addrs
        ]
        self._checked_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None

    @property
    def workers(self) -> list[WorkerClient]:
        return self.prefill + self.decode

    def report(self) -> HealthReport:
        return HealthReport(
            prefill={w.addr: w.healthy for w in self.prefill},
            decode={w.addr: w.healthy for w in self.decode},
        )

    async def _check_all(self) -> None:
        await asyncio.gather(*(w.check_health() for w in self.workers))
        self._checked_at = time.monotonic()

    async def refresh_health(self, max_age: float = HEALTH_MAX_AGE_S) -> HealthReport:
        """Checks every worker, unless that was done less than max_age seconds ago."""
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < max_age:
            return self.report()
        task = self._inflight
        # One round of checks at a time: concurrent /health calls share it.
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = self._inflight = asyncio.ensure_future(self._check_all())
        await asyncio.shield(task)
        return self.report()

    async def health_loop(self, interval: float = 2.0) -> None:
        """Keeps the routers' view of health fresh (runs for the app's lifetime)."""
        while True:
            try:
                await self.refresh_health(max_age=interval / 2)
            except Exception:
                logger.exception("health check round failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._inflight
        for w in self.workers:
            await w.close()
