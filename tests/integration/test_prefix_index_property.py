"""Property: on random workloads, the Redis index's lookups equal a brute-force reference.

Workers store, evict and re-announce random runs of blocks of prompts that share
prefixes (holes included: a worker may hold block 3 without block 2); some workers die.
The reference keeps each worker's set of hashes in Python and counts leading blocks.
"""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.redis_server import RedisServer
from shared.block_hash import block_hashes
from shared.prefix_index import IndexKeys, IndexWriter, PrefixIndexReader, WorkerStatus

BLOCK = 2

# A prompt is a list of block symbols; few symbols, so prompts share prefixes often.
prompts_strategy = st.lists(
    st.lists(st.integers(0, 2), min_size=0, max_size=7), min_size=1, max_size=6
)
op_strategy = st.tuples(
    st.sampled_from(["store", "store", "remove", "reannounce"]),
    st.integers(0, 3),  # worker
    st.integers(0, 5),  # prompt
    st.integers(0, 7),  # first block
    st.integers(0, 7),  # end block
)


def hashes_of(symbols: list[int]) -> list[bytes]:
    tokens = [s for s in symbols for _ in range(BLOCK)]
    return block_hashes(tokens, BLOCK, model="m")


def leading(held: set[bytes], hashes: list[bytes]) -> int:
    count = 0
    for h in hashes:
        if h not in held:
            break
        count += 1
    return count


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prompts=prompts_strategy,
    num_workers=st.integers(1, 4),
    ops=st.lists(op_strategy, max_size=25),
    dead=st.sets(st.integers(0, 3), max_size=3),
)
def test_lookups_equal_a_brute_force_reference(
    redis_server: RedisServer,
    prompts: list[list[int]],
    num_workers: int,
    ops: list[tuple[str, int, int, int, int]],
    dead: set[int],
) -> None:
    keys = IndexKeys(f"p{uuid.uuid4().hex[:10]}:")
    client = redis_server.client()
    writer = IndexWriter(client, keys)
    prompt_hashes = [hashes_of(p) for p in prompts]
    names = [f"w{i}" for i in range(num_workers)]
    slots = [writer.heartbeat(WorkerStatus(n, f"127.0.0.1:{i}"), 60_000).slot
             for i, n in enumerate(names)]
    reference: list[set[bytes]] = [set() for _ in names]
    try:
        for kind, worker, prompt, first, end in ops:
            worker %= num_workers
            run = prompt_hashes[prompt % len(prompts)][first:end]
            if kind == "store":
                writer.store(slots[worker], run)
                reference[worker] |= set(run)
            elif kind == "remove":
                writer.remove(slots[worker], run)
                reference[worker] -= set(run)
            else:
                writer.reconcile(slots[worker], run)
                reference[worker] = set(run)
        for worker in dead:
            if worker < num_workers:
                writer.leave(slots[worker])
        live = [i for i in range(num_workers) if i not in dead]

        async def check() -> None:
            reader = PrefixIndexReader(redis_server.url, key_prefix=keys.prefix)
            try:
                for hashes in prompt_hashes:
                    expected = {names[i]: leading(reference[i], hashes) for i in live}
                    assert await reader.lookup(hashes) == expected
                await reader.reap_dead(budget=3)  # small batches: several rounds
                for hashes in prompt_hashes:
                    expected = {names[i]: leading(reference[i], hashes) for i in live}
                    assert await reader.lookup(hashes) == expected
            finally:
                await reader.close()

        asyncio.run(check())
        # After the janitor: every block key's holders are exactly the live reference.
        all_hashes = {h for hashes in prompt_hashes for h in hashes}
        for h in all_hashes:
            holders = {int(s) for s in client.smembers(keys.block(h))}
            assert holders == {slots[i] for i in live if h in reference[i]}
        for i in range(num_workers):
            if i not in live:
                assert not client.exists(keys.held(slots[i]))
    finally:
        stale = list(client.scan_iter(match=f"{keys.prefix}*", count=1000))
        if stale:
            client.delete(*stale)
