"""Prefix cache: pages of full KV blocks that outlive their request, found by block hash.

A block's hash names its whole prefix (see shared/block_hash.py), so a prompt's cached
prefix is the longest run of its leading hashes present here. The cache holds one pool
reference on each page it keeps; a request that reuses a page holds another. Pages that
only the cache references are evicted least recently used first, leaves before their
ancestors (a chain is touched from its end to its root), so a cached chain shrinks from
its tail and never leaves unreachable blocks behind it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from shared.kv_pool import KVPool, KVPoolExhausted

BlockListener = Callable[[list[bytes]], None]


class PrefixMatch(NamedTuple):
    pages: list[int]  # one per matched block; the caller holds a reference on each
    num_tokens: int


class PrefixCache:
    def __init__(
        self,
        pool: KVPool,
        on_stored: BlockListener | None = None,
        on_removed: BlockListener | None = None,
    ) -> None:
        self.pool = pool
        self._on_stored = on_stored
        self._on_removed = on_removed
        # hash -> page, in eviction order (front = evicted first)
        self._pages: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hit_tokens = 0
        self.queried_tokens = 0

    def __len__(self) -> int:
        return len(self._pages)

    def match(self, hashes: Sequence[bytes], max_blocks: int | None = None) -> PrefixMatch:
        """Pages of the longest cached prefix of `hashes` (at most max_blocks), referenced."""
        limit = len(hashes) if max_blocks is None else min(max_blocks, len(hashes))
        with self._lock:
            pages: list[int] = []
            for block_hash in hashes[:limit]:
                page = self._pages.get(block_hash)
                if page is None:
                    break
                pages.append(page)
            self.pool.incref(pages)
            self._touch(hashes[: len(pages)])
            num_tokens = len(pages) * self.pool.page_size
            self.hit_tokens += num_tokens
            self.queried_tokens += len(hashes) * self.pool.page_size
        return PrefixMatch(pages, num_tokens)

    def insert(self, hashes: Sequence[bytes], pages: Sequence[int]) -> None:
        """Keeps the pages of these full blocks (the caller keeps its own references)."""
        if len(pages) < len(hashes):
            raise ValueError(f"{len(hashes)} block hashes for {len(pages)} pages")
        stored: list[bytes] = []
        with self._lock:
            for block_hash, page in zip(hashes, pages, strict=False):
                if block_hash in self._pages:
                    continue  # another request computed the same block first
                self.pool.incref([page])
                self._pages[block_hash] = page
                stored.append(block_hash)
            self._touch(hashes)
        if stored and self._on_stored is not None:
            self._on_stored(stored)

    def allocate(self, num_pages: int) -> list[int]:
        """Fresh pages, evicting cached blocks that no request uses when the pool is short."""
        try:
            return self.pool.allocate(num_pages)
        except KVPoolExhausted:
            self.evict(num_pages - self.pool.num_free)
            return self.pool.allocate(num_pages)

    def evict(self, num_pages: int) -> int:
        """Frees up to num_pages pages that only the cache references; returns how many."""
        removed: list[bytes] = []
        with self._lock:
            for block_hash, page in list(self._pages.items()):
                if len(removed) >= num_pages:
                    break
                if self.pool.refcount(page) == 1:
                    del self._pages[block_hash]
                    self.pool.free([page])
                    removed.append(block_hash)
        if removed and self._on_removed is not None:
            self._on_removed(removed)
        return len(removed)

    def clear(self) -> int:
        return self.evict(len(self._pages))

    def num_idle_pages(self) -> int:
        """Pages that only the cache holds: free for the taking, by eviction."""
        with self._lock:
            return sum(1 for page in self._pages.values() if self.pool.refcount(page) == 1)

    def snapshot(self) -> list[bytes]:
        """Every block held, for a full re-announce to the prefix index."""
        with self._lock:
            return list(self._pages)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _touch(self, chain: Sequence[bytes]) -> None:
        # End of the chain first, root last: the root becomes the most recently used.
        for block_hash in reversed(chain):
            if block_hash in self._pages:
                self._pages.move_to_end(block_hash)
