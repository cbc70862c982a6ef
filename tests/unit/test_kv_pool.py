from __future__ import annotations

import threading

import pytest
import torch

from shared.kv_pool import KVPool, KVPoolExhausted
from shared.model.config import ModelConfig


def make_pool(num_pages: int = 8, page_size: int = 4) -> KVPool:
    return KVPool(
        num_layers=2, num_kv_heads=2, head_dim=8, num_pages=num_pages, page_size=page_size
    )


def test_layout_and_zero_init() -> None:
    pool = make_pool()
    assert pool.kv.shape == (2, 2, 8, 4, 2, 8)
    assert pool.kv.dtype == torch.float32
    assert not pool.kv.any()
    assert pool.page_bytes() == 2 * 2 * 4 * 2 * 8 * 4
    assert (pool.num_free, pool.num_used) == (8, 0)


def test_pages_for() -> None:
    pool = make_pool(page_size=4)
    assert [pool.pages_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free() -> None:
    pool = make_pool()
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert len(set(a) | set(b)) == 5
    assert all(pool.refcount(p) == 1 for p in a + b)
    assert (pool.num_free, pool.num_used) == (3, 5)
    pool.free(a)
    assert all(pool.refcount(p) == 0 for p in a)
    assert (pool.num_free, pool.num_used) == (6, 2)
    assert pool.allocate(0) == []
    c = pool.allocate(6)
    assert set(c).isdisjoint(b)


def test_exhaustion_is_all_or_nothing() -> None:
    pool = make_pool(num_pages=4)
    pool.allocate(3)
    with pytest.raises(KVPoolExhausted) as err:
        pool.allocate(2)
    assert (err.value.requested, err.value.free) == (2, 1)
    assert pool.num_free == 1  # nothing taken by the failed call
    assert len(pool.allocate(1)) == 1


def test_refcounts_share_pages() -> None:
    pool = make_pool()
    pages = pool.allocate(2)
    pool.incref(pages)
    assert [pool.refcount(p) for p in pages] == [2, 2]
    pool.free(pages)
    assert pool.num_used == 2  # still owned once
    pool.free(pages)
    assert pool.num_used == 0
    with pytest.raises(ValueError):
        pool.incref(pages)  # incref of a free page


def test_double_free_raises_and_changes_nothing() -> None:
    pool = make_pool()
    a = pool.allocate(2)
    pool.free(a[:1])
    with pytest.raises(ValueError):
        pool.free(a)  # a[0] already free
    assert pool.refcount(a[1]) == 1
    with pytest.raises(ValueError):
        pool.free([a[1], a[1]])  # one owner, two frees
    assert pool.refcount(a[1]) == 1
    with pytest.raises(ValueError):
        pool.free([99])


def test_thread_safety_smoke() -> None:
    pool = make_pool(num_pages=64)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(500):
                pages = pool.allocate(3)
                pool.incref(pages)
                pool.free(pages)
                pool.free(pages)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.num_free == 64
    assert all(pool.refcount(p) == 0 for p in range(64))


def test_for_model_sizing() -> None:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=100,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        max_context=8192,
        tie_word_embeddings=True,
        eos_token_ids=(2,),
        bos_token_id=1,
    )
    per_token = 30 * 2 * 3 * 64 * 4
    assert cfg.kv_bytes_per_token(torch.float32) == per_token
    assert cfg.kv_bytes_per_token(torch.bfloat16) == per_token // 2
    pool = KVPool.for_model(cfg, kv_cache_mb=8, page_size=16)
    assert pool.num_pages == 8 * 2**20 // (per_token * 16)
    assert pool.page_bytes() == per_token * 16
    assert pool.kv.shape == (30, 2, pool.num_pages, 16, 3, 64)
    bf16 = KVPool.for_model(cfg, kv_cache_mb=8, page_size=16, dtype=torch.bfloat16)
    assert bf16.num_pages == 2 * pool.num_pages or bf16.num_pages == 2 * pool.num_pages + 1
    with pytest.raises(ValueError):
        KVPool.for_model(cfg, kv_cache_mb=0)
