"""The Redis schema of the global prefix index, and the worker status that crosses it.

Keys (P is the key prefix, "kvr:" by default; a "slot" is a small integer per worker id):

    P slots           HASH  worker_id -> slot (assigned once by INCR P slot_seq, kept)
    P workers         SET   slots that may have entries (what the janitor walks)
    P live:<slot>     HASH  WorkerStatus fields, PEXPIRE liveness TTL: present = alive
    P held:<slot>     SET   16-byte block hashes the worker holds (cleanup, re-announce diff)
    P sync:<slot>     SET   a full re-announce being staged (short TTL)
    P b:<hash>        SET   slots holding the block; 16 raw hash bytes in the key name

Why this shape, for hundreds of workers and millions of blocks:
- A lookup walks the prompt's block keys in one Lua call (one round trip), intersecting
  each block's holders with the live workers still matching, and stops at the first
  block no live worker holds: its cost follows the matched prefix, not the worker count.
- Holders are integer slots, so Redis keeps each block's set as a compact intset
  (tens of bytes per block) instead of a hash table of strings.
- Each worker's own `held` set makes a dead worker's cleanup and a full re-announce
  (a set difference) cheap without scanning the key space.
- Every multi-key operation runs as one Lua script, so lookups never see half a batch.
  The scripts build key names from the prefix, so the index lives on one Redis primary
  (replicas and failover are fine; Redis Cluster sharding is not supported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_KEY_PREFIX = "kvr:"


class PrefixIndexUnavailable(Exception):
    """Redis could not be reached (or answered with an error) for the prefix index."""


@dataclass(frozen=True)
class IndexKeys:
    prefix: str = DEFAULT_KEY_PREFIX

    @property
    def slots(self) -> str:
        return self.prefix + "slots"

    @property
    def workers(self) -> str:
        return self.prefix + "workers"

    def live(self, slot: int) -> str:
        return f"{self.prefix}live:{slot}"

    def held(self, slot: int) -> str:
        return f"{self.prefix}held:{slot}"

    def staged(self, slot: int) -> str:
        return f"{self.prefix}sync:{slot}"

    def block(self, block_hash: bytes) -> bytes:
        return self.prefix.encode() + b"b:" + block_hash


@dataclass(frozen=True)
class WorkerStatus:
    """A prefill worker as the index knows it: where to reach it, its load, when last seen.

    Written by the worker's publisher (the `live:<slot>` hash), read by gateways.
    """

    worker_id: str
    address: str  # gRPC host:port
    queued_tokens: int = 0  # prompt tokens waiting for or in prefill
    kv_used_pages: int = 0
    kv_total_pages: int = 0
    updated_at: float = 0.0  # Unix time of the last heartbeat: "last seen"
    started_at: float = 0.0  # Unix time the publisher started
    instance: str = ""  # random per publisher: tells two processes with one worker id apart

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_flat(cls, flat: Sequence[bytes | str]) -> WorkerStatus:
        """From HGETALL's flat [field, value, ...] reply; unknown fields are ignored."""
        values = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
        kwargs: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = values.get(field.name)
            if raw is None:
                continue
            if field.type in ("int", int):
                kwargs[field.name] = int(raw)
            elif field.type in ("float", float):
                kwargs[field.name] = float(raw)
            else:
                kwargs[field.name] = raw
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def kv_usage(self) -> float:
        return self.kv_used_pages / self.kv_total_pages if self.kv_total_pages else 0.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
