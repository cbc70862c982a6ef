"""Bounds on the generation endpoints: the gateway's own line, and optional per-key limits.

- `--max-concurrent-requests N`: at most N generations in flight at this gateway (streams
  included, until their last byte); one more is a 503 with Retry-After at once, before its
  body is read, instead of a queue that grows without bound under overload.
- `--per-key-max-concurrent N`, `--per-key-rate R` (`--per-key-burst B`): per API key (the
  Bearer token the client sends; the client's address without one), at most N in flight
  and R requests per second on average (a token bucket of B). Over either: a 429 with
  Retry-After (for the rate, the seconds until the bucket has a token again).

Keys are kept as SHA-256 digests, never as the secrets themselves, and idle buckets are
forgotten, so random keys cannot grow the tables without bound.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.errors import UNAVAILABLE, APIError, error_response

logger = logging.getLogger("kvrelay.gateway")

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
RATE_LIMITED = "rate_limit_exceeded"
MAX_TRACKED_KEYS = 10_000  # past this many keys, idle ones are forgotten


@dataclass(frozen=True)
class LimitSettings:
    max_concurrent: int = 0  # at this gateway, all keys together (0: no bound)
    per_key_concurrent: int = 0
    per_key_rate: float = 0.0  # requests per second
    per_key_burst: int = 0  # 0: max(1, rate)

    @property
    def enabled(self) -> bool:
        return bool(self.max_concurrent or self.per_key_concurrent or self.per_key_rate)

    @property
    def burst(self) -> float:
        return float(self.per_key_burst or max(1.0, self.per_key_rate))


@dataclass
class _Bucket:
    tokens: float
    updated: float

    def refill(self, now: float, rate: float, capacity: float) -> None:
        self.tokens = min(capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now


class LimitsMiddleware:
    """Pure ASGI: counts a streamed answer as in flight until its last byte is sent."""

    def __init__(self, app: ASGIApp, settings: LimitSettings) -> None:
        self.app = app
        self.settings = settings
        self.in_flight = 0
        self._key_in_flight: dict[bytes, int] = {}
        self._buckets: dict[bytes, _Bucket] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        key = _client_key(scope)
        refusal = self._refusal(key)
        if refusal is not None:
            err, retry_after = refusal
            logger.info("rejected POST %s: %d %s", scope.get("path"), err.status, err.message)
            response = error_response(err)
            response.headers["Retry-After"] = str(retry_after)
            await response(scope, receive, send)
            return
        self.in_flight += 1
        self._key_in_flight[key] = self._key_in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            left = self._key_in_flight[key] - 1
            if left:
                self._key_in_flight[key] = left
            else:
                del self._key_in_flight[key]

    def _refusal(self, key: bytes) -> tuple[APIError, int] | None:
        """Why this request may not start now, and when to come back; None: it may."""
        s = self.settings
        if s.per_key_concurrent and self._key_in_flight.get(key, 0) >= s.per_key_concurrent:
            return APIError(
                429,
                f"this API key already has {s.per_key_concurrent} requests in flight",
                code=RATE_LIMITED,
            ), 1
        if s.per_key_rate:
            wait_s = self._take_token(key)
            if wait_s > 0:
                return APIError(
                    429,
                    f"this API key is over its rate of {s.per_key_rate:g} requests/s",
                    code=RATE_LIMITED,
                ), max(1, math.ceil(wait_s))
        if s.max_concurrent and self.in_flight >= s.max_concurrent:
            return APIError(
                503,
                f"the gateway is at its bound of {s.max_concurrent} requests in flight",
                type=UNAVAILABLE,
                code="overloaded",
            ), 1
        return None

    def _take_token(self, key: bytes) -> float:
        """0 if the key's bucket gave a token, else the seconds until it will have one."""
        s = self.settings
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_KEYS:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(s.burst, now)
        bucket.refill(now, s.per_key_rate, s.burst)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / s.per_key_rate

    def _forget_idle(self, now: float) -> None:
        """Drops full buckets (a full bucket is what a new key starts with anyway)."""
        s = self.settings
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now, s.per_key_rate, s.burst)
            if bucket.tokens >= s.burst:
                del self._buckets[key]


def _client_key(scope: Scope) -> bytes:
    """The API key the client presents (as a digest), else its address."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return hashlib.sha256(b"key:" + value.strip()).digest()
    client = scope.get("client") or ("unknown", 0)
    return hashlib.sha256(f"addr:{client[0]}".encode()).digest()
