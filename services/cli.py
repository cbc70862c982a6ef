"""The `kvrelay` command: `up` (the whole cluster) or one service each.

Every flag `--some-flag` can also be set with the environment variable
`KVRELAY_SOME_FLAG` (what docker compose and Nomad use); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from shared.observability.logs import configure_logging


def _env_name(flag: str) -> str:
    return "KVRELAY_" + flag.lstrip("-").replace("-", "_").upper()


class _EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to their KVRELAY_* variables."""

    def add_env_argument(self, flag: str, **kwargs: Any) -> None:
        env_value = os.environ.get(_env_name(flag))
        if env_value is not None:
            if kwargs.get("action") == "store_true":
                kwargs["default"] = env_value.lower() in ("1", "true", "yes", "on")
            else:
                kwargs["default"] = kwargs.get("type", str)(env_value)
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {_env_name(flag)}]".strip()
        self.add_argument(flag, **kwargs)


def _add_common(parser: _EnvParser) -> None:
    parser.add_env_argument("--model-path", default=None,
                            help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_env_argument("--served-model-name", default=None,
                            help="model name clients use (default: from the model path)")
    parser.add_env_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_env_argument("--redis-url", default=None, help="Redis for the prefix index")
    parser.add_env_argument("--internal-token", default=None,
                            help="shared secret of the workers' gRPC and KV channel (kvrelay up "
                                 "makes one); set it through the variable, not the command line")
    _add_logging(parser)


def _add_logging(parser: _EnvParser) -> None:
    parser.add_env_argument("--log-level", default="info",
                            choices=["debug", "info", "warning", "error"])
    parser.add_env_argument("--log-format", default="text", choices=["text", "json"],
                            help="log lines as text, or one JSON object per line")


def _add_gateway_flags(parser: _EnvParser) -> None:
    parser.add_env_argument("--api-key", default=None, help="require this Bearer key on /v1/*")
    parser.add_env_argument("--chat-template", default=None,
                            help="Jinja chat template (file or inline) overriding the model's")
    parser.add_env_argument("--tool-call-parser", default=None,
                            choices=["hermes", "qwen25", "qwen", "llama3"],
                            help="format of the model's tool calls (default: from its chat "
                                 "template; none found: tool calls stay text)")
    parser.add_env_argument("--reasoning-parser", default=None, choices=["deepseek-r1", "qwen3"],
                            help="answer <think> blocks as reasoning_content")
    parser.add_env_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024,
                            help="larger request bodies get a 413")
    parser.add_env_argument("--router-policy", default=None,
                            choices=["prefix", "approx", "round_robin", "least_load"],
                            help="how prompts pick a prefill worker (default: prefix with "
                                 "Redis, approx without)")
    parser.add_env_argument("--router-uncached-weight", type=float, default=1.0,
                            help="routing cost per prompt token the worker has to compute")
    parser.add_env_argument("--router-load-weight", type=float, default=0.5,
                            help="routing cost per prompt token queued on the worker")
    _add_gateway_resilience_flags(parser)


def _add_gateway_resilience_flags(parser: _EnvParser) -> None:
    parser.add_env_argument("--fallback-url", default=None,
                            help="OpenAI-compatible base URL that serves requests when no "
                                 "prefill/decode pair can")
    parser.add_env_argument("--fallback-api-key", default=None,
                            help="Bearer key for --fallback-url (the client's is not passed on)")
    parser.add_env_argument("--fallback-model", default=None,
                            help="model name to ask --fallback-url for (default: the client's)")
    parser.add_env_argument("--max-concurrent-requests", type=int, default=0,
                            help="generation requests in flight at the gateway, at most; "
                                 "more get a 503 with Retry-After (0: no bound)")
    parser.add_env_argument("--per-key-max-concurrent", type=int, default=0,
                            help="requests in flight per API key, at most; more get a 429 "
                                 "(0: no limit)")
    parser.add_env_argument("--per-key-rate", type=float, default=0.0,
                            help="requests per second per API key (token bucket); more get "
                                 "a 429 with Retry-After (0: no limit)")
    parser.add_env_argument("--per-key-burst", type=int, default=0,
                            help="bucket size of --per-key-rate (0: the rate, at least 1)")
    parser.add_env_argument("--health-check-interval-s", type=float, default=2.0,
                            help="how often the gateway checks every worker's gRPC health")
    parser.add_env_argument("--health-check-timeout-s", type=float, default=1.0,
                            help="a worker that does not answer its health check within this "
                                 "is routed around until it does")


def _add_worker_flags(parser: _EnvParser) -> None:
    parser.add_env_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_env_argument("--kv-cache-mb", type=int, default=512,
                            help="KV pool size of each worker, in MiB")
    parser.add_env_argument("--block-size", type=int, default=16, help="tokens per KV page")
    parser.add_env_argument("--kv-transport", default="zmq", choices=["zmq", "nixl"],
                            help="how KV pages go from prefill to decode: ZeroMQ, or NIXL "
                                 "(UCX; decode reads prefill's pages)")
    parser.add_env_argument("--num-threads", type=int, default=None,
                            help="torch threads per worker")
    parser.add_env_argument("--max-prefill-tokens", type=int, default=4096,
                            help="prompt tokens computed in one step, all prompts together")
    parser.add_env_argument("--chunked-prefill-size", type=int, default=2048,
                            help="longest piece of one prompt in one step")
    parser.add_env_argument("--enable-lora", action="store_true",
                            help="serve LoRA adapters (PEFT format); implied by --lora-paths")
    parser.add_env_argument("--lora-paths", nargs="*", default=[],
                            help="adapters to load at start: name=path ... (a bare path is "
                                 "named after its folder; the variable: comma-separated)")
    parser.add_env_argument("--max-loras-per-batch", type=int, default=8,
                            help="distinct LoRA adapters in one forward step")
    parser.add_env_argument("--max-lora-rank", type=int, default=0,
                            help="largest LoRA rank accepted (0: any)")
    parser.add_env_argument("--enable-return-routed-experts", action="store_true",
                            help="MoE models: requests may ask for the experts each token "
                                 "was routed to (return_routed_experts, as SGLang)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_EnvParser)

    up = commands.add_parser("up", help="gateway, prefill and decode workers on this machine")
    _add_common(up)
    _add_gateway_flags(up)
    _add_worker_flags(up)
    up.add_env_argument("--port", type=int, default=30000, help="gateway HTTP port")
    up.add_env_argument("--prefill", type=int, default=1, help="number of prefill workers")
    up.add_env_argument("--decode", type=int, default=1, help="number of decode workers")
    up.add_env_argument("--no-redis", action="store_true",
                        help="do not start a private redis-server")
    up.add_env_argument("--colocated", action="store_true",
                        help="one process doing prefill and decode (mixed chunked prefill), "
                             "instead of disaggregated workers: the baseline to compare with")

    gateway = commands.add_parser("gateway", help="the OpenAI-compatible HTTP gateway")
    _add_common(gateway)
    _add_gateway_flags(gateway)
    gateway.add_env_argument("--port", type=int, default=30000)
    gateway.add_env_argument("--prefill-addrs", required="KVRELAY_PREFILL_ADDRS" not in os.environ,
                             help="comma-separated host:port of the prefill workers' gRPC")
    gateway.add_env_argument("--decode-addrs", required="KVRELAY_DECODE_ADDRS" not in os.environ,
                             help="comma-separated host:port of the decode workers' gRPC")
    gateway.add_env_argument("--request-timeout-s", type=float, default=600.0)

    bench = commands.add_parser(
        "bench", add_help=False, help="TTFT/TPOT load tests (kvrelay bench --help)"
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    for role in ("prefill", "decode"):
        worker = commands.add_parser(role, help=f"one {role} worker")
        _add_common(worker)
        _add_worker_flags(worker)
        worker.add_env_argument("--port", type=int, default=0, help="gRPC port (0: any free)")
        worker.add_env_argument("--advertise-host", default=None,
                                help="address other services use to reach this worker")
        worker.add_env_argument("--worker-id", default="")
        worker.add_env_argument("--metrics-port", type=int, default=0,
                                help="serve Prometheus /metrics on this port (0: do not)")
        worker.add_env_argument("--max-queued-requests", type=int, default=256,
                                help="requests waiting for compute or KV pages before 503s")
        worker.add_env_argument("--drain-timeout-s", type=float, default=8.0,
                                help="at SIGTERM, how long calls in flight may take to finish")
        if role == "prefill":
            worker.add_env_argument("--kv-send-timeout-s", type=float, default=3.0,
                                    help="how long a decode worker may take to accept KV "
                                         "before the request fails")
        if role == "decode":
            worker.add_env_argument("--kv-port", type=int, default=0,
                                    help="KV receive port (0: any free)")
            worker.add_env_argument("--kv-timeout-s", type=float, default=60.0,
                                    help="how long reserved pages wait for their KV")
            worker.add_env_argument("--queue-timeout-s", type=float, default=30.0,
                                    help="longest wait for KV pages before a 503")
            worker.add_env_argument("--colocated", action="store_true",
                                    help="also prefill, in this process (for comparison)")

    status = commands.add_parser("status", help="the cluster's workers: health, load, KV use")
    _add_logging(status)
    status.add_env_argument("--redis-url", default=None,
                            help="Redis the workers announce themselves in")
    status.add_env_argument("--metrics-urls", default="",
                            help="comma-separated worker /metrics URLs, besides those in Redis")
    status.add_env_argument("--watch", type=float, default=0.0,
                            help="refresh every this many seconds (0: once)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _split(addresses: str) -> list[str]:
    return [a.strip() for a in addresses.split(",") if a.strip()]


def lora_paths_arg(value: str | list[str]) -> list[str]:
    """--lora-paths as given: a list of flags, or KVRELAY_LORA_PATHS (comma-separated)."""
    return _split(value) if isinstance(value, str) else list(value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The load tester has its own parser (also `python -m loadtest`).
        from loadtest.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, service=args.command)
    if args.command == "status":
        from services.status import run_status

        return run_status(args)
    if args.command == "up":
        from services.launcher import run_cluster

        return run_cluster(args)
    if args.command == "gateway":
        from services.gateway.config import GatewayConfig
        from services.gateway.server import serve

        serve(
            GatewayConfig(
                prefill_addrs=_split(args.prefill_addrs),
                decode_addrs=_split(args.decode_addrs),
                model_path=args.model_path,
                served_model_name=args.served_model_name,
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                chat_template=args.chat_template,
                tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser,
                max_request_body_bytes=args.max_request_body_bytes,
                request_timeout_s=args.request_timeout_s,
                log_level=args.log_level,
                redis_url=args.redis_url,
                router_policy=args.router_policy,
                router_uncached_weight=args.router_uncached_weight,
                router_load_weight=args.router_load_weight,
                internal_token=args.internal_token,
                fallback_url=args.fallback_url,
                fallback_api_key=args.fallback_api_key,
                fallback_model=args.fallback_model,
                max_concurrent_requests=args.max_concurrent_requests,
                per_key_max_concurrent=args.per_key_max_concurrent,
                per_key_rate=args.per_key_rate,
                per_key_burst=args.per_key_burst,
                health_check_interval_s=args.health_check_interval_s,
                health_check_timeout_s=args.health_check_timeout_s,
            )
        )
        return 0
    from services.worker_server import run_worker
    from shared.config import WorkerConfig

    config = WorkerConfig(
        role=args.command,
        model_path=args.model_path,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        worker_id=args.worker_id,
        dtype=args.dtype,
        kv_cache_mb=args.kv_cache_mb,
        block_size=args.block_size,
        kv_transport=args.kv_transport,
        num_threads=args.num_threads,
        redis_url=args.redis_url,
        served_model_name=args.served_model_name,
        metrics_port=args.metrics_port,
    )
    if args.command == "decode":
        config.kv_port = args.kv_port
        config.kv_timeout_s = args.kv_timeout_s
        config.queue_timeout_s = args.queue_timeout_s
        config.colocated = args.colocated
        if args.colocated:
            config.kv_transport = "local"
    config.max_prefill_tokens = args.max_prefill_tokens
    config.chunked_prefill_size = args.chunked_prefill_size
    config.max_queued_requests = args.max_queued_requests
    config.internal_token = args.internal_token or None
    config.drain_timeout_s = args.drain_timeout_s
    if args.command == "prefill":
        config.kv_send_timeout_s = args.kv_send_timeout_s
    config.lora_paths = lora_paths_arg(args.lora_paths)
    config.enable_lora = args.enable_lora or bool(config.lora_paths)
    config.max_loras_per_batch = args.max_loras_per_batch
    config.max_lora_rank = args.max_lora_rank
    config.enable_return_routed_experts = args.enable_return_routed_experts
    return run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
