"""The `kvrelay` command: `up` (the whole cluster) or one service each.

Every flag `--some-flag` can also be set with the environment variable
`KVRELAY_SOME_FLAG` (what docker compose and Nomad use); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


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
    parser.add_env_argument("--log-level", default="info",
                            choices=["debug", "info", "warning", "error"])


def _add_gateway_flags(parser: _EnvParser) -> None:
    parser.add_env_argument("--api-key", default=None, help="require this Bearer key on /v1/*")
    parser.add_env_argument("--chat-template", default=None,
                            help="Jinja chat template (file or inline) overriding the model's")
    parser.add_env_argument("--router-policy", default=None,
                            choices=["prefix", "approx", "round_robin", "least_load"],
                            help="how prompts pick a prefill worker (default: prefix with "
                                 "Redis, approx without)")
    parser.add_env_argument("--router-uncached-weight", type=float, default=1.0,
                            help="routing cost per prompt token the worker has to compute")
    parser.add_env_argument("--router-load-weight", type=float, default=0.5,
                            help="routing cost per prompt token queued on the worker")


def _add_worker_flags(parser: _EnvParser) -> None:
    parser.add_env_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_env_argument("--kv-cache-mb", type=int, default=512,
                            help="KV pool size of each worker, in MiB")
    parser.add_env_argument("--block-size", type=int, default=16, help="tokens per KV page")
    parser.add_env_argument("--kv-transport", default="zmq", choices=["zmq"])
    parser.add_env_argument("--num-threads", type=int, default=None,
                            help="torch threads per worker")
    parser.add_env_argument("--max-prefill-tokens", type=int, default=4096,
                            help="prompt tokens computed in one step, all prompts together")
    parser.add_env_argument("--chunked-prefill-size", type=int, default=2048,
                            help="longest piece of one prompt in one step")


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
        worker.add_env_argument("--max-queued-requests", type=int, default=256,
                                help="requests waiting for compute or KV pages before 503s")
        if role == "decode":
            worker.add_env_argument("--kv-port", type=int, default=0,
                                    help="KV receive port (0: any free)")
            worker.add_env_argument("--kv-timeout-s", type=float, default=60.0,
                                    help="how long reserved pages wait for their KV")
            worker.add_env_argument("--queue-timeout-s", type=float, default=30.0,
                                    help="longest wait for KV pages before a 503")
            worker.add_env_argument("--colocated", action="store_true",
                                    help="also prefill, in this process (for comparison)")
    return parser


def _split(addresses: str) -> list[str]:
    return [a.strip() for a in addresses.split(",") if a.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The load tester has its own parser (also `python -m loadtest`).
        from loadtest.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
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
                request_timeout_s=args.request_timeout_s,
                log_level=args.log_level,
                redis_url=args.redis_url,
                router_policy=args.router_policy,
                router_uncached_weight=args.router_uncached_weight,
                router_load_weight=args.router_load_weight,
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
    run_worker(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
