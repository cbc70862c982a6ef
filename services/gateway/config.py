"""Settings of the gateway process (filled by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    tool_call_parser: str | None = None  # hermes|qwen25|llama3; None: from the chat template
    reasoning_parser: str | None = None  # deepseek-r1|qwen3; None: reasoning stays in content
    max_request_body_bytes: int = 16 * 1024 * 1024  # larger bodies get a 413
    request_timeout_s: float = 600.0
    log_level: str = "info"
    redis_url: str | None = None  # the prefix index; None: route without it
    router_policy: str | None = None  # prefix|approx|round_robin|least_load; None: see below
    router_uncached_weight: float = 1.0  # cost per prompt token the worker must compute
    router_load_weight: float = 0.5  # cost per prompt token queued on the worker (see policies)
    # Faults, overload, security (README "Faults and overload", "Security"):
    internal_token: str | None = field(default=None, repr=False)  # sent to the workers' gRPC
    fallback_url: str | None = None  # OpenAI-compatible base URL when no pair can serve
    fallback_api_key: str | None = field(default=None, repr=False)
    fallback_model: str | None = None  # model name to ask the fallback for (None: as sent)
    max_concurrent_requests: int = 0  # generation requests in flight, at most (0: unbounded)
    per_key_max_concurrent: int = 0  # per API key (0: no limit) -> 429
    per_key_rate: float = 0.0  # requests/s per API key (0: no limit) -> 429
    per_key_burst: int = 0  # token bucket size (0: max(1, rate))
    health_check_interval_s: float = 2.0
    health_check_timeout_s: float = 1.0

    @property
    def effective_router_policy(self) -> str:
        """`prefix` with a Redis index, `approx` without, unless configured."""
        if self.router_policy:
            return self.router_policy
        return "prefix" if self.redis_url else "approx"
