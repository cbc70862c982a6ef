"""Settings of the gateway process (filled by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GatewayConfig:
    prefill_addrs: list[str]  # gRPC "host:port" of prefill workers
    decode_addrs: list[str]
    model_path: str | None = None  # None = default model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    chat_template: str | None = None  # file path or inline Jinja; overrides the tokenizer's
    request_timeout_s: float = 600.0
    log_level: str = "info"
    redis_url: str | None = None  # the prefix index; None: route without it
    router_policy: str | None = None  # prefix|approx|round_robin|least_load; None: see below
    router_uncached_weight: float = 1.0  # cost per prompt token the worker must compute
    router_load_weight: float = 0.5  # cost per prompt token queued on the worker (see policies)

    @property
    def effective_router_policy(self) -> str:
        """`prefix` with a Redis index, `approx` without, unless configured."""
        if self.router_policy:
            return self.router_policy
        return "prefix" if self.redis_url else "approx"
