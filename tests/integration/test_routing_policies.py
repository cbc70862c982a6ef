"""The gateway's router against a real Redis index (the workers' side is their real publisher).

No worker process runs here: the router's decisions need the index and the gateway's own
load figures only. The end-to-end path is in test_routing_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.cli import build_parser
from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.router import PolicyRouter, Route
from services.gateway.routing.approx_tree import ApproxPrefixTree
from services.gateway.routing.build import Routing, build_routing
from services.gateway.server import create_app
from services.gateway.worker_clients import WorkerPool
from services.processes import free_port
from services.redis_server import RedisServer
from shared.block_hash import block_hashes
from shared.prefix_index import PrefixIndexPublisher, PrefixIndexUnavailable

MODEL = "test-model"
BLOCK = 16


def prompt(seed: int, tokens: int, shared: list[int] | None = None) -> list[int]:
    own = [(seed * 104729 + i * 31) % 49152 for i in range(tokens)]
    return (shared or []) + own


def hashes(tokens: list[int], salt: str | None = None) -> list[bytes]:
    return block_hashes(tokens, BLOCK, model=MODEL, cache_salt=salt)


def make_routing(policy: str, redis_url: str | None, num_prefill: int = 2, num_decode: int = 1,
                 key_prefix: str = "kvr:", **overrides: float) -> Routing:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(num_prefill + num_decode)]
    config = GatewayConfig(
        prefill_addrs=addrs[:num_prefill], decode_addrs=addrs[num_prefill:],
        redis_url=redis_url, router_policy=policy, **overrides,  # type: ignore[arg-type]
    )
    pool = WorkerPool(config.prefill_addrs, config.decode_addrs)
    routing = build_routing(config, pool, MODEL, GatewayMetrics(), index_key_prefix=key_prefix)
    for index, view in enumerate(routing.directory.prefill):
        view.worker_id = f"prefill-{index}"  # what GetInfo reports, in the real gateway
    return routing


def key_prefix_of(routing: Routing) -> str:
    assert routing.reader is not None
    return routing.reader.keys.prefix


class Workers:
    """Publishers standing in for the prefill workers' prefix caches."""

    def __init__(self, routing: Routing, redis_url: str, **kwargs: float) -> None:
        self.publishers = [
            PrefixIndexPublisher(redis_url, view.worker_id or "", view.addr,
                                 key_prefix=key_prefix_of(routing), **kwargs)  # type: ignore[arg-type]
            for view in routing.directory.prefill
        ]
        self.held: list[list[bytes]] = [[] for _ in self.publishers]
        for index, publisher in enumerate(self.publishers):
            publisher.set_snapshot(lambda i=index: list(self.held[i]))  # type: ignore[misc]
            publisher.start()
        # Registered and live in Redis before any test routes: otherwise the router sees
        # no live worker in the index and falls back to least_load.
        for publisher in self.publishers:
            assert publisher.flush(10)

    def store(self, worker: int, blocks: list[bytes]) -> None:
        self.held[worker] += blocks
        self.publishers[worker].blocks_stored(blocks)
        assert self.publishers[worker].flush(10)

    def close(self) -> None:
        for publisher in self.publishers:
            publisher.close()


@pytest.fixture
def isolated_prefix(redis_server: RedisServer) -> Iterator[str]:
    """Each test its own index keys in the suite's Redis."""
    value = f"r{uuid.uuid4().hex[:8]}:"
    yield value
    client = redis_server.client()
    stale = list(client.scan_iter(match=f"{value}*", count=1000))
    if stale:
        client.delete(*stale)


def route(router: PolicyRouter, tokens: list[int], salt: str | None = None) -> Route:
    return asyncio.run(router.route(tokens, needs_decode=True, cache_salt=salt))


def test_prefix_policy_sends_a_prompt_to_the_worker_holding_its_prefix(
    redis_server: RedisServer, isolated_prefix: str
) -> None:
    routing = make_routing("prefix", redis_server.url, key_prefix=isolated_prefix)
    workers = Workers(routing, redis_server.url)
    try:
        system = prompt(1, 40 * BLOCK)
        workers.store(1, hashes(system)[:40])
        workers.store(0, hashes(prompt(2, 10 * BLOCK))[:10])
        chosen = route(routing.router, prompt(3, 50, shared=system))
        assert chosen.prefill is routing.directory.prefill[1].client
        assert chosen.policy == "prefix"
        assert chosen.predicted_cached_tokens == 40 * BLOCK
        # Another tenant's salt hides the cached prefix: nothing is predicted cached.
        salted = route(routing.router, prompt(3, 50, shared=system), salt="tenant-b")
        assert salted.predicted_cached_tokens == 0
    finally:
        workers.close()


def test_queued_load_outweighs_a_short_cached_prefix_unless_weighted_away(
    redis_server: RedisServer, isolated_prefix: str
) -> None:
    for load_weight, expected in ((1.0, 0), (0.0, 1)):
        routing = make_routing("prefix", redis_server.url, key_prefix=isolated_prefix,
                               router_load_weight=load_weight)
        workers = Workers(routing, redis_server.url)
        try:
            shared = prompt(4, 4 * BLOCK)
            workers.store(1, hashes(shared)[:4])  # 64 tokens cached on worker 1 ...
            routing.directory.prefill[1].queued_uncached_tokens = 5000  # ... which is busy
            chosen = route(routing.router, prompt(5, 400, shared=shared))
            assert chosen.prefill is routing.directory.prefill[expected].client, load_weight
        finally:
            workers.close()


def test_reported_load_counts_other_gateways_but_not_our_finished_requests(
    redis_server: RedisServer, isolated_prefix: str
) -> None:
    routing = make_routing("prefix", redis_server.url, key_prefix=isolated_prefix,
                           router_load_weight=1.0)
    workers = Workers(routing, redis_server.url)
    assert routing.reader is not None
    reader = routing.reader

    def report(worker: int, queued: int) -> None:
        workers.publishers[worker].set_load(queued, 0, 100)

        async def reported() -> int:
            try:
                return (await reader.live_workers())[f"prefill-{worker}"].queued_tokens
            finally:
                await reader.close()

        for _ in range(100):
            if asyncio.run(reported()) == queued:
                return
        raise AssertionError("the load report did not arrive")

    try:
        system = prompt(35, 30 * BLOCK)
        workers.store(1, hashes(system)[:30])
        # Our own request on worker 1, reported while queued, then finished: the stale
        # report must not keep counting it.
        ours = route(routing.router, prompt(36, 20, shared=system))
        assert ours.prefill is routing.directory.prefill[1].client
        report(1, 500)
        ours.prefill_done()
        ours.release()
        again = route(routing.router, prompt(37, 20, shared=system))
        assert again.prefill is routing.directory.prefill[1].client
        again.release()
        # Load that other gateways sent (reported, not ours) does count.
        report(1, 5000)
        busy = route(routing.router, prompt(38, 20, shared=system))
        assert busy.prefill is routing.directory.prefill[0].client
    finally:
        workers.close()


def test_a_worker_whose_liveness_expired_is_never_chosen(
    redis_server: RedisServer, isolated_prefix: str
) -> None:
    routing = make_routing("prefix", redis_server.url, key_prefix=isolated_prefix)
    workers = Workers(routing, redis_server.url)
    try:
        system = prompt(6, 30 * BLOCK)
        workers.store(0, hashes(system)[:30])
        workers.publishers[0].close()  # worker 0 leaves: its liveness key goes
        for _ in range(4):
            chosen = route(routing.router, prompt(7, 20, shared=system))
            assert chosen.prefill is routing.directory.prefill[1].client
            chosen.release()
        # With no live worker in the index at all, requests are still served, by load.
        workers.publishers[1].close()
        chosen = route(routing.router, prompt(8, 20, shared=system))
        assert chosen.policy == "least_load"
    finally:
        workers.close()


def test_a_prompt_follows_a_recent_route_before_the_index_has_it(
    redis_server: RedisServer, isolated_prefix: str
) -> None:
    routing = make_routing("prefix", redis_server.url, key_prefix=isolated_prefix)
    workers = Workers(routing, redis_server.url)
    try:
        system = prompt(9, 64 * BLOCK)
        first = route(routing.router, prompt(10, 30, shared=system))
        # Prefill is done, but the worker's announcement has not reached Redis yet.
        first.prefill_done()
        second = route(routing.router, prompt(11, 30, shared=system))
        assert second.prefill is first.prefill
        assert second.predicted_cached_tokens == 64 * BLOCK
        # A different prompt meanwhile goes to the idle worker.
        third = route(routing.router, prompt(12, 64 * BLOCK))
        assert third.prefill is not first.prefill
    finally:
        workers.close()


def test_routes_in_flight_are_remembered_until_their_prefill_is_done() -> None:
    now = [0.0]
    tree = ApproxPrefixTree(max_age_s=5.0, clock=lambda: now[0])
    blocks = hashes(prompt(40, 8 * BLOCK))
    tree.record("w", blocks, pinned=True)  # sent, still queued behind other prompts
    now[0] = 100.0
    assert tree.depths(blocks, ["w", "v"]) == {"w": 8, "v": 0}
    tree.record("w", blocks)  # prefill done: from now on Redis knows within seconds
    now[0] = 104.0
    assert tree.depths(blocks, ["w"]) == {"w": 8}
    now[0] = 106.0
    assert tree.depths(blocks, ["w"]) == {"w": 0}


def test_redis_outage_routes_by_load_says_so_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path).start()
    routing = make_routing("prefix", server.url)
    workers = Workers(routing, server.url, liveness_ttl_s=3.0)
    assert routing.index_health is not None
    metrics = routing.router.metrics
    system = prompt(13, 20 * BLOCK)

    def gauge(name: str, **labels: str) -> float:
        value = metrics.registry.get_sample_value(name, labels or None)
        assert value is not None, name
        return value

    async def scenario() -> None:
        assert routing.index_health is not None
        probe = asyncio.create_task(routing.index_health.probe_loop(interval_s=0.1))
        try:
            workers.store(1, hashes(system)[:20])
            hit = await routing.router.route(prompt(14, 10, shared=system), needs_decode=True)
            assert (hit.policy, hit.prefill) == ("prefix", routing.directory.prefill[1].client)
            hit.release()
            assert gauge("kvrelay_gateway_prefix_index_up") == 1

            server.stop()
            with caplog.at_level(logging.WARNING, logger="kvrelay.gateway"):
                for index in range(5):
                    fallback = await routing.router.route(prompt(15 + index, 10),
                                                          needs_decode=True)
                    assert fallback.policy == "least_load"
                    fallback.release()
            warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
            assert gauge("kvrelay_gateway_prefix_index_up") == 0
            assert gauge("kvrelay_gateway_router_policy", policy="least_load") == 1
            assert gauge("kvrelay_gateway_router_policy", policy="prefix") == 0

            server.start()  # empty: the workers re-announce what they hold
            assert routing.reader is not None
            for _ in range(200):  # workers notice at their next beat (TTL 3 s: every 1 s)
                if routing.index_health.up:
                    with contextlib.suppress(PrefixIndexUnavailable):
                        if (await routing.reader.lookup(hashes(system)[:20])).get("prefill-1"):
                            break
                await asyncio.sleep(0.05)
            assert routing.index_health.up
            assert gauge("kvrelay_gateway_router_policy", policy="prefix") == 1
            back = await routing.router.route(prompt(20, 10, shared=system), needs_decode=True)
            assert (back.policy, back.prefill) == ("prefix", routing.directory.prefill[1].client)
            assert back.predicted_cached_tokens == 20 * BLOCK
        finally:
            probe.cancel()
            assert routing.reader is not None
            await routing.reader.close()

    try:
        asyncio.run(scenario())
        assert gauge("kvrelay_gateway_routed_requests_total", policy="least_load") == 5
        assert gauge("kvrelay_gateway_routed_requests_total", policy="prefix") == 2
    finally:
        workers.close()
        server.stop()


def test_approx_policy_learns_from_its_own_routes_and_forgets_past_capacity() -> None:
    routing = make_routing("approx", None)
    router = routing.router
    system = prompt(21, 20 * BLOCK)
    first = route(router, prompt(22, 10, shared=system))
    first.release()
    again = route(router, prompt(23, 10, shared=system))
    assert again.prefill is first.prefill
    assert again.predicted_cached_tokens == 20 * BLOCK
    other = route(router, prompt(24, 20 * BLOCK))
    assert other.prefill is not first.prefill  # a new prefix goes where the load is lower

    # A worker whose KV holds 8 pages keeps (the gateway believes) the prefix's first 8.
    routing = make_routing("approx", None)
    for view in routing.directory.prefill:
        view.num_pages = 8
    route(routing.router, prompt(25, 10, shared=system)).release()
    assert route(routing.router, prompt(26, 10, shared=system)).predicted_cached_tokens == (
        8 * BLOCK)


def test_round_robin_alternates_and_least_load_takes_the_idlest() -> None:
    routing = make_routing("round_robin", None, num_prefill=3)
    chosen = [route(routing.router, prompt(27, 40)).prefill for _ in range(6)]
    clients = [v.client for v in routing.directory.prefill]
    assert chosen == clients * 2

    routing = make_routing("least_load", None, num_prefill=3)
    big = route(routing.router, prompt(28, 900))
    medium = route(routing.router, prompt(29, 500))
    small = route(routing.router, prompt(30, 100))
    assert len({big.prefill, medium.prefill, small.prefill}) == 3
    assert route(routing.router, prompt(31, 50)).prefill is small.prefill
    big.prefill_done()
    assert route(routing.router, prompt(32, 50)).prefill is big.prefill


def test_decode_goes_to_the_least_busy_worker_with_room_for_the_prompt() -> None:
    routing = make_routing("round_robin", None, num_prefill=1, num_decode=3)
    d0, d1, d2 = routing.directory.decode
    d0.free_pages, d1.free_pages, d2.free_pages = 2, 100, 50
    long_prompt = prompt(33, 10 * BLOCK)  # 10 pages: d0 has no room
    first = route(routing.router, long_prompt)
    assert first.decode is d1.client  # the most free pages
    second = route(routing.router, long_prompt)
    assert second.decode is d2.client  # d1 is busier now
    first.release()
    assert route(routing.router, long_prompt).decode is d1.client
    no_decode = asyncio.run(routing.router.route(long_prompt, needs_decode=False))
    assert no_decode.decode is None


def test_release_returns_the_load_and_is_idempotent() -> None:
    routing = make_routing("least_load", None, num_prefill=1)
    view = routing.directory.prefill[0]
    decode = routing.directory.decode[0]
    chosen = route(routing.router, prompt(34, 300))
    assert (view.queued_tokens, view.inflight, decode.inflight) == (300, 1, 1)
    chosen.prefill_done(cached_tokens=0)
    assert (view.queued_tokens, view.inflight, decode.inflight) == (0, 0, 1)
    chosen.release()
    chosen.release()
    assert (view.queued_tokens, view.inflight, decode.inflight) == (0, 0, 0)


def test_policy_flags_and_defaults() -> None:
    args = build_parser().parse_args(["up", "--router-policy", "round_robin",
                                      "--router-load-weight", "0.25"])
    assert (args.router_policy, args.router_load_weight, args.router_uncached_weight) == (
        "round_robin", 0.25, 1.0)
    gateway = build_parser().parse_args(["gateway", "--prefill-addrs", "a:1", "--decode-addrs",
                                         "b:2", "--redis-url", "redis://127.0.0.1:1/0"])
    assert gateway.router_policy is None
    assert GatewayConfig([], [], redis_url="redis://x").effective_router_policy == "prefix"
    assert GatewayConfig([], []).effective_router_policy == "approx"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--router-policy", "random"])
    with pytest.raises(ValueError, match="redis-url"):
        make_routing("prefix", None)


def test_metrics_endpoint_shows_the_index_and_the_policy(
    default_model_dir: Path, redis_server: RedisServer, isolated_prefix: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    config = GatewayConfig([dead], [dead], model_path=str(default_model_dir),
                           served_model_name=MODEL, redis_url=redis_server.url)
    with TestClient(create_app(config)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("kvrelay_gateway_prefix_index_up", ())] == 1
    assert samples[("kvrelay_gateway_router_policy", (("policy", "prefix"),))] == 1
    assert samples[("kvrelay_gateway_router_policy", (("policy", "approx"),))] == 0
    assert ("kvrelay_gateway_prefix_lookup_seconds_count", ()) in samples
