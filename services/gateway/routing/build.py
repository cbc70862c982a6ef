"""Builds the router the configuration asks for, with what it needs to run."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.router import PolicyRouter
from services.gateway.routing.index_health import IndexHealth
from services.gateway.routing.policies import (
    POLICIES,
    ApproxPolicy,
    CostWeights,
    LeastLoadPolicy,
    PrefillPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
)
from services.gateway.routing.workers import WorkerDirectory
from services.gateway.worker_clients import WorkerPool
from shared.prefix_index import DEFAULT_KEY_PREFIX, PrefixIndexReader


@dataclass
class Routing:
    router: PolicyRouter
    directory: WorkerDirectory
    reader: PrefixIndexReader | None  # the Redis index, when `prefix` routes
    index_health: IndexHealth | None


def build_routing(
    config: GatewayConfig,
    pool: WorkerPool,
    model_name: str,
    metrics: GatewayMetrics,
    *,
    index_key_prefix: str = DEFAULT_KEY_PREFIX,
) -> Routing:
    name = config.effective_router_policy
    if name not in POLICIES:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}")
    weights = CostWeights(config.router_uncached_weight, config.router_load_weight)
    directory = WorkerDirectory(pool)
    reader: PrefixIndexReader | None = None
    health: IndexHealth | None = None
    policy: PrefillPolicy
    if name == "prefix":
        if not config.redis_url:
            raise ValueError("--router-policy prefix needs the Redis index: set --redis-url")
        reader = PrefixIndexReader(config.redis_url, key_prefix=index_key_prefix)
        health = IndexHealth(reader, metrics)
        policy = PrefixPolicy(reader, weights, on_lookup=metrics.prefix_lookup_seconds.observe)
    elif name == "approx":
        policy = ApproxPolicy(weights)
    elif name == "least_load":
        policy = LeastLoadPolicy()
    else:
        policy = RoundRobinPolicy()
    router = PolicyRouter(
        directory, policy, metrics, model_name=model_name, index_health=health
    )
    return Routing(router, directory, reader, health)
