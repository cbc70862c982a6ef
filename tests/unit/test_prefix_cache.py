from __future__ import annotations

import pytest

from shared.kv_pool import KVPool, KVPoolExhausted
from shared.prefix_cache import PrefixCache


def _pool(num_pages: int = 8) -> KVPool:
    return KVPool(num_layers=1, num_kv_heads=1, head_dim=4, num_pages=num_pages, page_size=4)


def _chain(name: str, n: int) -> list[bytes]:
    return [f"{name}{i}".encode() for i in range(n)]


def test_finished_request_leaves_its_full_blocks_behind() -> None:
    pool = _pool()
    stored: list[bytes] = []
    cache = PrefixCache(pool, on_stored=stored.extend)
    pages = pool.allocate(3)  # 2 full blocks and a partial one
    cache.insert(_chain("a", 2), pages)
    pool.free(pages)
    assert pool.num_used == 2 and stored == _chain("a", 2)
    match = cache.match([*_chain("a", 2), b"other"])
    assert match.pages == pages[:2] and match.num_tokens == 8
    assert [pool.refcount(p) for p in match.pages] == [2, 2]
    pool.free(match.pages)


def test_match_stops_at_first_missing_block_and_respects_max_blocks() -> None:
    pool = _pool()
    cache = PrefixCache(pool)
    pages = pool.allocate(3)
    cache.insert(_chain("a", 3), pages)
    pool.free(pages)
    assert cache.match([b"a0", b"zz", b"a2"]).pages == pages[:1]
    pool.free(pages[:1])
    limited = cache.match(_chain("a", 3), max_blocks=2)
    assert limited.pages == pages[:2]
    pool.free(limited.pages)
    assert cache.match([b"nothing"]).pages == []


def test_allocate_evicts_unreferenced_leaves_first() -> None:
    pool = _pool(num_pages=4)
    removed: list[bytes] = []
    cache = PrefixCache(pool, on_removed=removed.extend)
    pages = pool.allocate(4)
    cache.insert(_chain("a", 4), pages)
    pool.free(pages)
    assert pool.num_free == 0
    fresh = cache.allocate(2)
    # The chain shrinks from its tail: its first blocks are still reachable.
    assert removed == [b"a3", b"a2"]
    assert cache.match(_chain("a", 4)).pages == pages[:2]
    pool.free(pages[:2])
    pool.free(fresh)


def test_pages_in_use_are_never_evicted() -> None:
    pool = _pool(num_pages=2)
    cache = PrefixCache(pool)
    pages = pool.allocate(2)
    cache.insert(_chain("a", 2), pages)  # the request still holds its pages
    with pytest.raises(KVPoolExhausted):
        cache.allocate(1)
    pool.free(pages)
    assert len(cache.allocate(1)) == 1


def test_duplicate_blocks_keep_the_first_page() -> None:
    pool = _pool()
    cache = PrefixCache(pool)
    first = pool.allocate(1)
    second = pool.allocate(1)
    cache.insert([b"x"], first)
    cache.insert([b"x"], second)
    pool.free(first)
    pool.free(second)
    assert pool.num_used == 1 and cache.snapshot() == [b"x"]
    assert cache.match([b"x"]).pages == first
    pool.free(first)


def test_clear_returns_every_page() -> None:
    pool = _pool()
    cache = PrefixCache(pool)
    pages = pool.allocate(5)
    cache.insert(_chain("a", 5), pages)
    pool.free(pages)
    assert cache.clear() == 5
    assert pool.num_free == pool.num_pages and len(cache) == 0
