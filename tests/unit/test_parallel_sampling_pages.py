"""Pages of parallel sampling: shared full pages, a private copy of the partial last one."""

from __future__ import annotations

import pytest
import torch

from services.decode.parallel_sampling import fork_pages, pages_to_reserve
from shared.kv_pool import KVPool
from shared.sampler import SamplingParams


def _pool() -> KVPool:
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=4, num_pages=16, page_size=4)
    pool.kv.copy_(torch.randn_like(pool.kv))
    return pool


@pytest.mark.parametrize(("prompt_len", "n", "expected"), [(10, 3, 3 + 2), (8, 3, 2), (1, 1, 1)])
def test_reservation_counts_one_copy_per_extra_choice(prompt_len: int, n: int,
                                                      expected: int) -> None:
    assert pages_to_reserve(_pool(), prompt_len, n) == expected


def test_choices_share_full_pages_and_copy_the_partial_one() -> None:
    pool = _pool()
    reserved = pool.allocate(pages_to_reserve(pool, 10, 3))  # 2 full pages + 1 partial + 2
    choices = fork_pages(pool, 10, reserved, 3)
    assert choices[0] == reserved[:3]
    for pages in choices[1:]:
        assert pages[:2] == reserved[:2]
        assert pages[2] in reserved[3:]
        assert torch.equal(pool.kv[:, :, pages[2]], pool.kv[:, :, reserved[2]])
    assert choices[1][2] != choices[2][2]
    assert [pool.refcount(p) for p in reserved[:2]] == [3, 3]
    assert [pool.refcount(p) for p in reserved[2:]] == [1, 1, 1]
    # Writing into one choice's last page leaves the others' untouched.
    pool.kv[:, :, choices[1][2]].zero_()
    assert not torch.equal(pool.kv[:, :, choices[2][2]], pool.kv[:, :, choices[1][2]])
    for pages in choices:
        pool.free(pages)
    assert pool.num_free == pool.num_pages


def test_prompt_of_whole_pages_needs_no_copy() -> None:
    pool = _pool()
    reserved = pool.allocate(pages_to_reserve(pool, 8, 4))
    choices = fork_pages(pool, 8, reserved, 4)
    assert all(pages == reserved for pages in choices)
    assert [pool.refcount(p) for p in reserved] == [4, 4]
    for pages in choices:
        pool.free(pages)
    assert pool.num_free == pool.num_pages


def test_wrong_number_of_spares_is_refused() -> None:
    pool = _pool()
    with pytest.raises(ValueError, match="spare pages"):
        fork_pages(pool, 10, pool.allocate(4), 3)


def test_choice_zero_keeps_the_seed_and_the_others_differ() -> None:
    params = SamplingParams(temperature=1.0, seed=42, n=3)
    seeds = [params.for_choice(i).seed for i in range(3)]
    assert seeds[0] == 42
    assert len(set(seeds)) == 3
    assert all(params.for_choice(i).n == 1 for i in range(3))
    assert SamplingParams(n=2).for_choice(1).seed is None  # unseeded stays unseeded
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
