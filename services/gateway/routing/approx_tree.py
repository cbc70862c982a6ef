"""An approximate prefix index that a gateway builds from its own routing history.

Because a block hash names its whole prefix, the hash chain is a prefix tree: a map
hash -> workers is its nodes. Each worker's entries are an LRU bounded by that worker's KV
capacity, touched leaf first so that, like the workers' own caches, a chain is forgotten
from its tail. "Approximate": the gateway cannot see what a worker really evicts, and
another gateway's routes are unknown to it. With `max_age_s`, entries also expire: the
prefix policy uses that to remember only routes too recent to be in Redis yet.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

DEFAULT_CAPACITY_BLOCKS = 1 << 16


class ApproxPrefixTree:
    def __init__(
        self,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_age_s = max_age_s
        self._clock = clock
        self._holders: dict[bytes, dict[str, float]] = {}  # hash -> worker -> last routed
        self._per_worker: dict[str, OrderedDict[bytes, float]] = {}  # LRU, oldest first

    def __len__(self) -> int:
        return len(self._holders)

    def record(
        self,
        worker: str,
        hashes: Sequence[bytes],
        capacity: int = DEFAULT_CAPACITY_BLOCKS,
        *,
        pinned: bool = False,
    ) -> None:
        """`worker` now holds the blocks of `hashes` (it was just sent that prompt).

        `pinned` entries do not age (a prompt still queued on the worker); recording the
        same blocks again unpinned starts their clock.
        """
        now = self._clock()
        stamp = float("inf") if pinned else now
        lru = self._per_worker.setdefault(worker, OrderedDict())
        for block_hash in reversed(hashes):  # the root ends most recent: evicted last
            lru[block_hash] = stamp
            lru.move_to_end(block_hash)
            self._holders.setdefault(block_hash, {})[worker] = stamp
        while len(lru) > max(capacity, 0):
            self._drop_holder(lru.popitem(last=False)[0], worker)
        self._expire(worker, now)

    def depths(self, hashes: Sequence[bytes], workers: Iterable[str]) -> dict[str, int]:
        """Each worker's number of leading blocks of `hashes` believed held."""
        now = self._clock()
        oldest = now - self._max_age_s if self._max_age_s is not None else float("-inf")
        matching = set(workers)
        depth = dict.fromkeys(matching, 0)
        for index, block_hash in enumerate(hashes):
            if not matching:
                break
            holders = self._holders.get(block_hash, {})
            matching = {w for w in matching if w in holders and holders[w] >= oldest}
            for worker in matching:
                depth[worker] = index + 1
        return depth

    def forget_worker(self, worker: str) -> None:
        for block_hash in self._per_worker.pop(worker, OrderedDict()):
            self._drop_holder(block_hash, worker)

    def _drop_holder(self, block_hash: bytes, worker: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.pop(worker, None)
            if not holders:
                del self._holders[block_hash]

    def _expire(self, worker: str, now: float) -> None:
        if self._max_age_s is None:
            return
        lru = self._per_worker[worker]
        # Oldest first in the LRU, so expired entries sit at its front.
        while lru:
            block_hash, routed_at = next(iter(lru.items()))
            if routed_at >= now - self._max_age_s:
                break
            del lru[block_hash]
            self._drop_holder(block_hash, worker)
