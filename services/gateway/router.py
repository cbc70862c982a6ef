"""Which prefill and decode worker serve a request.

Round robin over the healthy workers for now; a prefix-aware router (sending a prompt
to the workers that already hold its prefix) can replace it behind the same `route()`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.gateway.errors import UNAVAILABLE, APIError
from services.gateway.worker_clients import WorkerClient, WorkerPool


@dataclass(frozen=True)
class Route:
    prefill: WorkerClient
    decode: WorkerClient | None  # None: prefill alone answers (max_tokens == 1)


class Router(Protocol):
    def route(self, prompt_token_ids: Sequence[int], *, needs_decode: bool) -> Route: ...


class RoundRobinRouter:
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._prefill_turn = itertools.count()
        self._decode_turn = itertools.count()

    @staticmethod
    def _pick(workers: list[WorkerClient], turn: itertools.count[int], role: str) -> WorkerClient:
        if not workers:
            raise APIError(503, f"no {role} worker is configured", type=UNAVAILABLE)
        now = time.monotonic()
        candidates = [w for w in workers if w.usable(now)]
        # With none known healthy, still try one: the call then fails with the real reason.
        pool = candidates or workers
        return pool[next(turn) % len(pool)]

    def route(self, prompt_token_ids: Sequence[int], *, needs_decode: bool) -> Route:
        prefill = self._pick(self._pool.prefill, self._prefill_turn, "prefill")
        decode = (
            self._pick(self._pool.decode, self._decode_turn, "decode") if needs_decode else None
        )
        return Route(prefill=prefill, decode=decode)
