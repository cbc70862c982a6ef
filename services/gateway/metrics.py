"""The gateway's Prometheus metrics (served at /metrics).

One registry per app rather than prometheus-client's global one: tests build several
apps in one process, and each must count only its own requests.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.gateway.routing.policies import POLICIES
from services.gateway.worker_clients import WorkerPool
from shared.observability.request_metrics import RequestMetrics


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.prefix_index_up = Gauge(
            "kvrelay_gateway_prefix_index_up",
            "1 while the Redis prefix index answers, 0 while it does not "
            "(absent without an index)",
            registry=self.registry,
        )
        self.router_policy = Gauge(
            "kvrelay_gateway_router_policy",
            "1 for the routing policy in use now (a fallback shows here), 0 for the others",
            ["policy"],
            registry=self.registry,
        )
        self.routed_requests = Counter(
            "kvrelay_gateway_routed_requests",
            "Requests routed, by the policy that chose their prefill worker",
            ["policy"],
            registry=self.registry,
        )
        self.prefix_lookup_seconds = Histogram(
            "kvrelay_gateway_prefix_lookup_seconds",
            "Time of one prefix index lookup in Redis (one round trip)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5),
            registry=self.registry,
        )
        self.predicted_cached_tokens = Counter(
            "kvrelay_gateway_predicted_cached_tokens",
            "Prompt tokens the router expected the chosen prefill worker to have cached",
            registry=self.registry,
        )
        # The cluster's prefix cache hit rate, as the prefill workers report it per request
        # (named as the load tester expects: hit rate = hit tokens / query tokens).
        self.prefill_prompt_tokens = Counter(
            "kvrelay_prefix_cache_query_tokens",
            "Prompt tokens of the prefills that completed",
            registry=self.registry,
        )
        self.prefill_cached_tokens = Counter(
            "kvrelay_prefix_cache_hit_tokens",
            "Of those, the tokens prefill workers found in their prefix caches",
            registry=self.registry,
        )

        # Requests by status, TTFT/TPOT/ITL/E2E, tokens, retries (recorded per HTTP request).
        self.requests = RequestMetrics(self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU...

    def watch_pool(self, pool: WorkerPool) -> None:
        """Each worker's health as this gateway sees it, read at scrape time."""
        self.registry.register(_WorkerHealthCollector(pool))

    def show_policy(self, active: str) -> None:
        for policy in POLICIES:
            self.router_policy.labels(policy=policy).set(1 if policy == active else 0)


class _WorkerHealthCollector(Collector):
    """1 while the gateway routes to a worker, 0 while it counts it as failed (its circuit is
    open: no requests until a health check or STALE_HEALTH_S lets it be tried again)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kvrelay_gateway_worker_healthy",
            "1 while the gateway counts the worker healthy, 0 while it routes around it",
            labels=["role", "address"],
        )
        for worker in self.pool.workers:
            family.add_metric([worker.role, worker.addr], 1 if worker.healthy else 0)
        yield family
