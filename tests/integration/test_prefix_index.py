"""The Redis prefix index against a real redis-server: announce, evict, lookup, liveness,
worker death, Redis restart, and one round trip per lookup."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from services.processes import ChildProcess
from services.redis_server import RedisServer
from shared.block_hash import block_hashes
from shared.prefix_index import (
    IndexKeys,
    IndexWriter,
    PrefixIndexPublisher,
    PrefixIndexReader,
    PrefixIndexUnavailable,
    WorkerStatus,
)

BLOCK = 16


def prompt_hashes(seed: int, blocks: int) -> list[bytes]:
    tokens = [(seed * 7919 + i) % 49152 for i in range(blocks * BLOCK)]
    return block_hashes(tokens, BLOCK, model="test-model")


@pytest.fixture
def prefix(redis_server: RedisServer) -> Iterator[str]:
    """A key prefix of the test's own; its keys are deleted afterwards."""
    value = f"t{uuid.uuid4().hex[:8]}:"
    yield value
    client = redis_server.client()
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    if keys:
        client.delete(*keys)


def lookup(reader: PrefixIndexReader, hashes: list[bytes]) -> dict[str, int]:
    async def go() -> dict[str, int]:
        try:
            return await reader.lookup(hashes)
        finally:
            await reader.close()

    return asyncio.run(go())


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


class FakeCache:
    """What a prefill worker's prefix cache tells the publisher: a set of block hashes."""

    def __init__(self, publisher: PrefixIndexPublisher) -> None:
        self.held: list[bytes] = []
        self.publisher = publisher
        publisher.set_snapshot(lambda: list(self.held))

    def store(self, hashes: list[bytes]) -> None:
        new = [h for h in hashes if h not in self.held]
        self.held += new
        self.publisher.blocks_stored(new)

    def evict(self, hashes: list[bytes]) -> None:
        self.held = [h for h in self.held if h not in hashes]
        self.publisher.blocks_removed(hashes)


@pytest.fixture
def publishers(redis_server: RedisServer, prefix: str) -> Iterator[
    Callable[..., tuple[PrefixIndexPublisher, FakeCache]]
]:
    started: list[PrefixIndexPublisher] = []

    def make(worker_id: str, **kwargs: float) -> tuple[PrefixIndexPublisher, FakeCache]:
        publisher = PrefixIndexPublisher(
            redis_server.url, worker_id, f"127.0.0.1:{1000 + len(started)}",
            key_prefix=prefix, **kwargs,  # type: ignore[arg-type]
        )
        cache = FakeCache(publisher)
        publisher.start()
        started.append(publisher)
        return publisher, cache

    yield make
    for publisher in started:
        publisher.close()


def test_announce_then_lookup_counts_leading_blocks_per_live_worker(
    redis_server: RedisServer, prefix: str, publishers: Callable[..., tuple[
        PrefixIndexPublisher, FakeCache]]
) -> None:
    prompt = prompt_hashes(1, 12)
    a, cache_a = publishers("worker-a")
    b, cache_b = publishers("worker-b")
    c, _ = publishers("worker-c")
    cache_a.store(prompt[:10])
    cache_b.store(prompt[:4])
    for p in (a, b, c):
        assert p.flush(10)
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)
    assert lookup(reader, prompt) == {"worker-a": 10, "worker-b": 4, "worker-c": 0}
    # Another prompt sharing only the first 3 blocks' tokens has other hashes after them.
    other = prompt_hashes(2, 8)
    assert lookup(reader, other) == {"worker-a": 0, "worker-b": 0, "worker-c": 0}
    assert lookup(reader, []) == {"worker-a": 0, "worker-b": 0, "worker-c": 0}


def test_evicted_blocks_are_no_longer_found(
    redis_server: RedisServer, prefix: str, publishers: Callable[..., tuple[
        PrefixIndexPublisher, FakeCache]]
) -> None:
    prompt = prompt_hashes(3, 8)
    publisher, cache = publishers("worker-a")
    cache.store(prompt)
    assert publisher.flush(10)
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)
    assert lookup(reader, prompt) == {"worker-a": 8}
    cache.evict(prompt[5:])  # the tail goes first, as the worker's LRU evicts it
    assert publisher.flush(10)
    assert lookup(reader, prompt) == {"worker-a": 5}
    cache.evict(prompt[2:3])  # a hole: the match stops before it
    assert publisher.flush(10)
    assert lookup(reader, prompt) == {"worker-a": 2}
    cache.evict(prompt)
    assert publisher.flush(10)
    assert lookup(reader, prompt) == {"worker-a": 0}
    client = redis_server.client()
    keys = IndexKeys(prefix)
    assert not any(client.exists(keys.block(h)) for h in prompt), "empty block keys stay"


def test_load_and_last_seen_reach_the_gateway(
    redis_server: RedisServer, prefix: str, publishers: Callable[..., tuple[
        PrefixIndexPublisher, FakeCache]]
) -> None:
    publisher, _ = publishers("worker-a")
    before = time.time()
    publisher.set_load(queued_tokens=1234, kv_used_pages=7, kv_total_pages=100)
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)

    async def statuses() -> dict[str, WorkerStatus]:
        try:
            return await reader.live_workers()
        finally:
            await reader.close()

    wait_for(lambda: asyncio.run(statuses()).get("worker-a", WorkerStatus("", "")).queued_tokens
             == 1234, 5, "the load to be published")
    status = asyncio.run(statuses())["worker-a"]
    assert (status.address, status.kv_used_pages, status.kv_total_pages) == (
        "127.0.0.1:1000", 7, 100)
    assert status.updated_at >= before - 1


def test_lookup_is_one_round_trip_whatever_the_number_of_workers(
    redis_server: RedisServer, prefix: str
) -> None:
    writer = IndexWriter(redis_server.client(), IndexKeys(prefix))
    prompt = prompt_hashes(4, 512)  # an 8k-token prompt
    for index in range(50):
        status = WorkerStatus(f"w{index}", f"127.0.0.1:{2000 + index}")
        slot = writer.heartbeat(status, ttl_ms=60_000).slot
        writer.store(slot, prompt[: index * 10])
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)
    monitor_client = redis_server.client()
    marker_client = redis_server.client()
    marker_client.ping()  # connected now, so that its handshake is not seen below

    async def watched_lookup() -> tuple[dict[str, int], list[dict[str, object]]]:
        await reader.lookup(prompt)  # connects and loads the script first
        with monitor_client.monitor() as monitor:
            result = await reader.lookup(prompt)
            marker = f"end-{uuid.uuid4().hex}"
            marker_client.echo(marker)
            commands = []
            for command in monitor.listen():
                if marker in str(command["command"]):
                    break
                commands.append(command)
        await reader.close()
        return result, commands

    result, commands = asyncio.run(watched_lookup())
    assert result == {f"w{i}": min(i * 10, 512) for i in range(50)}
    from_clients = [c for c in commands if c["client_type"] != "lua"]
    assert len(from_clients) == 1, [c["command"] for c in from_clients]
    assert str(from_clients[0]["command"]).upper().startswith("EVALSHA")


def test_a_dead_worker_is_never_returned_and_its_entries_go(
    redis_server: RedisServer, prefix: str, tmp_path: Path, publishers: Callable[..., tuple[
        PrefixIndexPublisher, FakeCache]]
) -> None:
    prompt = prompt_hashes(5, 6)
    survivor, cache = publishers("survivor", liveness_ttl_s=1.0)
    cache.store(prompt[:3])
    assert survivor.flush(10)
    # The doomed worker is a real process, killed with SIGKILL: it never says goodbye.
    script = (
        "import sys, time\n"
        "from shared.prefix_index import PrefixIndexPublisher\n"
        "hashes = [bytes.fromhex(h) for h in sys.argv[3].split(',')]\n"
        "p = PrefixIndexPublisher(sys.argv[1], 'doomed', '127.0.0.1:9', liveness_ttl_s=1.0,\n"
        "                         key_prefix=sys.argv[2])\n"
        "p.set_snapshot(lambda: hashes)\n"
        "p.start()\n"
        "time.sleep(600)\n"
    )
    doomed = ChildProcess(
        "doomed-worker",
        [sys.executable, "-c", script, redis_server.url, prefix, ",".join(h.hex() for h in prompt)],
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        log_path=tmp_path / "doomed.log",
    ).start()
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)
    try:
        doomed.wait_ready(lambda: lookup(reader, prompt).get("doomed") == 6, timeout_s=30)
        assert lookup(reader, prompt) == {"doomed": 6, "survivor": 3}
        os.kill(doomed.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: "doomed" not in lookup(reader, prompt), 5, "the liveness key to expire")
        assert time.monotonic() - killed_at < 3.0  # TTL 1 s, beats every 1/3 s
        assert lookup(reader, prompt) == {"survivor": 3}
    finally:
        doomed.stop()

    async def reap() -> int:
        try:
            return await reader.reap_dead()
        finally:
            await reader.close()

    assert asyncio.run(reap()) == 6
    client = redis_server.client()
    keys = IndexKeys(prefix)
    doomed_slot = int(client.hget(keys.slots, "doomed") or 0)
    assert not client.exists(keys.held(doomed_slot))
    assert all(
        client.smembers(keys.block(h)) == {str(int(client.hget(keys.slots, "survivor") or 0))
                                           .encode()}
        for h in prompt[:3]
    )
    assert not any(client.exists(keys.block(h)) for h in prompt[3:])
    assert lookup(reader, prompt) == {"survivor": 3}


def test_redis_restart_is_followed_by_a_reannounce(tmp_path: Path) -> None:
    # A private redis-server: restarting the suite's shared one would disturb other tests.
    server = RedisServer(tmp_path).start()
    publisher = PrefixIndexPublisher(server.url, "worker-a", "127.0.0.1:1", liveness_ttl_s=1.5)
    try:
        cache = FakeCache(publisher)
        publisher.start()
        prompt = prompt_hashes(6, 10)
        cache.store(prompt)
        assert publisher.flush(10)
        reader = PrefixIndexReader(server.url)
        assert lookup(reader, prompt) == {"worker-a": 10}

        server.stop()
        with pytest.raises(PrefixIndexUnavailable):
            lookup(reader, prompt)
        cache.evict(prompt[7:])  # changes while Redis is away are not lost either
        server.start()  # same port, no data: the index is empty
        wait_for(lambda: lookup(reader, prompt) == {"worker-a": 7}, 10, "the re-announce")
        assert publisher.stats.reannounces >= 2
    finally:
        publisher.close()
        server.stop()


def test_a_lost_removal_is_repaired_by_the_periodic_reannounce(
    redis_server: RedisServer, prefix: str, publishers: Callable[..., tuple[
        PrefixIndexPublisher, FakeCache]]
) -> None:
    publisher, cache = publishers("worker-a", reannounce_interval_s=0.5)
    prompt = prompt_hashes(7, 8)
    cache.store(prompt)
    assert publisher.flush(10)
    # The worker evicts blocks, but the batch saying so never reaches Redis.
    cache.held = cache.held[:2]
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)
    assert lookup(reader, prompt) == {"worker-a": 8}
    wait_for(lambda: lookup(reader, prompt) == {"worker-a": 2}, 5, "the periodic re-announce")


def test_the_caller_never_waits_on_an_unreachable_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # its port is free: nothing listens there yet
    publisher = PrefixIndexPublisher(server.url, "worker-a", "127.0.0.1:1", liveness_ttl_s=1.0)
    cache = FakeCache(publisher)
    publisher.start()
    try:
        prompt = prompt_hashes(8, 64)
        started = time.perf_counter()
        for start in range(0, 64, 4):
            cache.store(prompt[start : start + 4])
            publisher.set_load(start, start, 100)
        assert time.perf_counter() - started < 0.05
        assert not publisher.flush(0.5)
        server.start()
        assert publisher.flush(10)
        reader = PrefixIndexReader(server.url)
        assert lookup(reader, prompt) == {"worker-a": 64}
    finally:
        publisher.close()
        server.stop()


def test_closing_a_publisher_leaves_the_index(
    redis_server: RedisServer, prefix: str
) -> None:
    publisher = PrefixIndexPublisher(redis_server.url, "worker-a", "127.0.0.1:1",
                                     key_prefix=prefix)
    cache = FakeCache(publisher)
    publisher.start()
    prompt = prompt_hashes(9, 5)
    cache.store(prompt)
    assert publisher.flush(10)
    publisher.close()
    reader = PrefixIndexReader(redis_server.url, key_prefix=prefix)
    assert lookup(reader, prompt) == {}
    client: redis.Redis = redis_server.client()
    assert not any(client.exists(IndexKeys(prefix).block(h)) for h in prompt)
