"""Synchronous writes to the index: the commands behind a worker's publisher.

Each method is one round trip (a pipeline of script calls), except a full re-announce,
which stages the worker's whole block set first. Callers handle redis.RedisError.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
import redis.exceptions

from shared.prefix_index.schema import IndexKeys, WorkerStatus
from shared.prefix_index.scripts import (
    HEARTBEAT,
    REAP,
    RECONCILE,
    REMOVE,
    STORE,
    LuaScript,
    load_all,
)

BATCH_SIZE = 1000  # hashes per script call: keeps each call short for other clients
STAGED_TTL_MS = 120_000  # a re-announce staged by a worker that died midway goes away


class Heartbeat(NamedTuple):
    slot: int
    was_live: bool  # False: first beat, or the key expired / Redis lost it: re-announce
    previous_instance: str


@dataclass(frozen=True)
class BlockEvent:
    stored: bool  # True: blocks stored; False: blocks removed
    hashes: Sequence[bytes]


class IndexWriter:
    def __init__(self, client: redis.Redis, keys: IndexKeys | None = None) -> None:
        self.client = client
        self.keys = keys or IndexKeys()

    def _execute(self, calls: Iterable[tuple[LuaScript, Sequence[Any]]]) -> list[Any]:
        """Runs the script calls in order in one pipeline; loads the scripts if Redis lost them."""
        batch = list(calls)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for script, args in batch:
                pipe.evalsha(script.sha, 0, self.keys.prefix, *args)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                # A restarted Redis has no scripts: load them and go again (idempotent calls).
                if attempt:
                    raise
                load_all(self.client)
        raise AssertionError("unreachable")

    def heartbeat(self, status: WorkerStatus, ttl_ms: int) -> Heartbeat:
        fields: list[str] = []
        for name, value in status.to_fields().items():
            fields += [name, value]
        (reply,) = self._execute([(HEARTBEAT, [status.worker_id, ttl_ms, *fields])])
        slot, was_live, previous = reply
        return Heartbeat(int(slot), bool(was_live), _text(previous))

    def apply(self, slot: int, events: Sequence[BlockEvent]) -> int:
        """Stored/removed batches, in order, in one round trip; returns the hashes written."""
        calls: list[tuple[LuaScript, Sequence[Any]]] = []
        for event in events:
            script = STORE if event.stored else REMOVE
            for start in range(0, len(event.hashes), BATCH_SIZE):
                calls.append((script, [slot, *event.hashes[start : start + BATCH_SIZE]]))
        if not calls:
            return 0
        return sum(int(n) for n in self._execute(calls))

    def store(self, slot: int, hashes: Sequence[bytes]) -> int:
        return self.apply(slot, [BlockEvent(True, hashes)])

    def remove(self, slot: int, hashes: Sequence[bytes]) -> int:
        return self.apply(slot, [BlockEvent(False, hashes)])

    def reconcile(self, slot: int, held: Sequence[bytes]) -> tuple[int, int]:
        """Makes the index hold exactly `held` for this worker: (entries added, removed)."""
        staged = self.keys.staged(slot)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(staged)
        for start in range(0, len(held), BATCH_SIZE * 10):
            pipe.sadd(staged, *held[start : start + BATCH_SIZE * 10])
        pipe.pexpire(staged, STAGED_TTL_MS)
        pipe.execute()
        (reply,) = self._execute([(RECONCILE, [slot])])
        return int(reply[0]), int(reply[1])

    def leave(self, slot: int) -> None:
        """Not live any more: gateways stop using this worker's entries at once."""
        self.client.delete(self.keys.live(slot))

    def reap(self, budget: int = 10_000) -> tuple[int, bool]:
        """Removes up to `budget` entries of dead workers: (removed, more remain)."""
        (reply,) = self._execute([(REAP, [budget])])
        return int(reply[0]), bool(reply[1])

    def reap_all(self, budget: int = 10_000, max_rounds: int = 1000) -> int:
        removed = 0
        for _ in range(max_rounds):
            count, more = self.reap(budget)
            removed += count
            if not more:
                break
        return removed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
