"""The gateway routes by prefixes cached under the request's adapter, never another's."""

from __future__ import annotations

import asyncio

from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.router import PolicyRouter, Route
from services.gateway.routing.build import build_routing
from services.gateway.worker_clients import WorkerPool
from services.processes import free_port
from shared.block_hash import block_hashes

MODEL = "test-model"
BLOCK = 16


def tokens(seed: int, count: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 49152 for i in range(count)]


def route(router: PolicyRouter, prompt: list[int], lora: str | None) -> Route:
    return asyncio.run(router.route(prompt, needs_decode=True, lora=lora))


def test_routing_history_and_hashes_are_per_adapter() -> None:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    config = GatewayConfig(addrs[:2], addrs[2:], router_policy="approx")
    routing = build_routing(config, WorkerPool(addrs[:2], addrs[2:]), MODEL, GatewayMetrics())
    router = routing.router
    assert isinstance(router, PolicyRouter)
    system = tokens(1, 20 * BLOCK)
    assert router.hashes(system, None, "key-a").hashes == block_hashes(
        system, BLOCK, model=MODEL, lora="key-a"
    )
    first = route(router, system + tokens(2, 10), "key-a")
    first.release()
    again = route(router, system + tokens(3, 10), "key-a")
    assert again.prefill is first.prefill and again.predicted_cached_tokens == 20 * BLOCK
    again.release()
    for lora in ("key-b", None):  # another adapter, or the base model: nothing cached
        other = route(router, system + tokens(4, 10), lora)
        assert other.predicted_cached_tokens == 0, lora
        other.release()
