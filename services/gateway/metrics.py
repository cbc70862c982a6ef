"""The gateway's Prometheus metrics (served at /metrics).

One registry per app rather than prometheus-client's global one: tests build several
apps in one process, and each must count only its own requests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.gateway.routing.policies import POLICIES


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

    def show_policy(self, active: str) -> None:
        for policy in POLICIES:
            self.router_policy.labels(policy=policy).set(1 if policy == active else 0)
