from __future__ import annotations

import asyncio

import pytest

from services.decode.admission import AdmissionRejected, PageAdmission
from shared.kv_pool import KVPool


def _pool(num_pages: int) -> KVPool:
    return KVPool(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=num_pages, page_size=4)


def test_request_that_can_never_fit_is_refused_for_good() -> None:
    admission = PageAdmission(_pool(4), max_waiting=8)
    with pytest.raises(AdmissionRejected) as excinfo:
        asyncio.run(admission.reserve(5, timeout_s=1))
    assert excinfo.value.ever


def test_waiters_are_served_in_arrival_order_as_pages_free_up() -> None:
    pool = _pool(4)
    admission = PageAdmission(pool, max_waiting=8)

    async def scenario() -> list[str]:
        held = pool.allocate(4)
        order: list[str] = []

        async def wait(name: str, pages: int) -> None:
            got = await admission.reserve(pages, timeout_s=5)
            order.append(name)
            await asyncio.sleep(0.05)
            pool.free(got)

        big = asyncio.create_task(wait("big", 3))
        await asyncio.sleep(0.02)
        small = asyncio.create_task(wait("small", 1))
        await asyncio.sleep(0.02)
        pool.free(held[:1])  # one page: enough for "small", but "big" came first
        await asyncio.sleep(0.05)
        assert order == []
        pool.free(held[1:])
        await asyncio.gather(big, small)
        return order

    assert asyncio.run(scenario()) == ["big", "small"]
    assert pool.num_free == 4 and admission.num_waiting == 0


def test_line_is_bounded_and_waiting_times_out() -> None:
    pool = _pool(2)
    admission = PageAdmission(pool, max_waiting=1)

    async def scenario() -> None:
        held = pool.allocate(2)
        waiter = asyncio.create_task(admission.reserve(1, timeout_s=0.2))
        await asyncio.sleep(0.02)
        with pytest.raises(AdmissionRejected, match="already wait"):
            await admission.reserve(1, timeout_s=1)
        with pytest.raises(AdmissionRejected, match="within"):
            await waiter
        pool.free(held)

    asyncio.run(scenario())
    assert admission.num_waiting == 0 and pool.num_free == 2


def test_headroom_is_kept_for_running_sequences_unless_idle() -> None:
    pool = _pool(4)
    running = 0
    admission = PageAdmission(pool, max_waiting=4, headroom_pages=lambda: running)

    async def scenario() -> None:
        nonlocal running
        first = await admission.reserve(4, timeout_s=0.1)  # idle pool: no headroom needed
        pool.free(first)
        held = pool.allocate(1)
        running = 1
        with pytest.raises(AdmissionRejected):
            await admission.reserve(3, timeout_s=0.1)  # would leave no page for the runner
        assert len(await admission.reserve(2, timeout_s=0.1)) == 2
        pool.free(held)

    asyncio.run(scenario())
