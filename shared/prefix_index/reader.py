"""The gateway's side of the index (asyncio): who holds how much of a prompt, who is alive.

Every call is one round trip (one EVALSHA); Redis errors and timeouts surface as
PrefixIndexUnavailable, so that a router can fall back at once. There are no retries on
purpose: a request waits at most one socket timeout for Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.block_hash import DIGEST_SIZE
from shared.prefix_index.schema import (
    DEFAULT_KEY_PREFIX,
    IndexKeys,
    PrefixIndexUnavailable,
    WorkerStatus,
)
from shared.prefix_index.scripts import LIVE_WORKERS, LOOKUP, REAP, LuaScript, load_all_async


class WorkerLoad(NamedTuple):
    """What routing needs of a worker's status (the lookup returns only this, to stay fast)."""

    worker_id: str
    address: str
    queued_tokens: int
    updated_at: float  # Unix time the worker reported queued_tokens


class WorkerMatch(NamedTuple):
    blocks: int  # leading blocks of the prompt this worker holds
    status: WorkerLoad


class PrefixIndexReader:
    def __init__(
        self,
        redis_url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_s: float = 0.5,
    ) -> None:
        self.redis_url = redis_url
        self.keys = IndexKeys(key_prefix)
        self._timeout_s = timeout_s
        self._client: redis.asyncio.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client_here(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        # An asyncio connection belongs to the loop it was made in (tests run several loops).
        if self._client is None or self._loop is not loop:
            self._client = redis.asyncio.Redis.from_url(
                self.redis_url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._loop = loop
        return self._client

    async def _call(self, script: LuaScript, *args: Any) -> Any:
        client = self._client_here()
        try:
            try:
                return await client.evalsha(script.sha, 0, self.keys.prefix, *args)
            except redis.exceptions.NoScriptError:
                # Redis restarted (scripts are not persisted): load them, ask again.
                await load_all_async(client)
                return await client.evalsha(script.sha, 0, self.keys.prefix, *args)
        except (TimeoutError, redis.RedisError, OSError) as exc:
            raise PrefixIndexUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def lookup(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """Live worker id -> how many leading blocks of `hashes` it holds (0 included)."""
        reply = json.loads(await self._call(LOOKUP, "0", _concat(hashes)))
        return {worker_id: depth for depth, worker_id in reply}

    async def match(self, hashes: Sequence[bytes]) -> dict[str, WorkerMatch]:
        """As lookup, with each live worker's status (address, load) in the same round trip."""
        reply = json.loads(await self._call(LOOKUP, "1", _concat(hashes)))
        return {
            worker_id: WorkerMatch(depth, WorkerLoad(worker_id, address, int(queued), updated))
            for depth, worker_id, address, queued, updated in reply
        }

    async def live_workers(self) -> dict[str, WorkerStatus]:
        """Worker id -> status (address, load, last seen) of every live worker."""
        reply = await self._call(LIVE_WORKERS)
        statuses = [WorkerStatus.from_flat(flat) for flat in reply]
        return {s.worker_id: s for s in statuses}

    async def reap_dead(self, budget: int = 10_000, max_rounds: int = 100) -> int:
        """Removes the entries of workers whose liveness expired; returns how many."""
        removed = 0
        for _ in range(max_rounds):
            count, more = await self._call(REAP, budget)
            removed += int(count)
            if not more:
                break
        return removed

    async def ping(self) -> bool:
        try:
            return bool(await self._client_here().ping())
        except (TimeoutError, redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


def _concat(hashes: Sequence[bytes]) -> bytes:
    if any(len(h) != DIGEST_SIZE for h in hashes):
        raise ValueError(f"block hashes have {DIGEST_SIZE} bytes")
    return b"".join(hashes)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
