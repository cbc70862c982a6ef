"""`kvrelay up`: the whole cluster on this machine, each service its own process."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import tempfile
import threading
from functools import partial
from pathlib import Path

from services.cli import lora_paths_arg
from services.processes import (
    ChildProcess,
    ChildProcessError,
    free_port,
    grpc_serving,
    http_healthy,
)
from services.redis_server import RedisServer
from shared.config import served_model_name
from shared.model.loader import resolve_model_dir
from shared.model.lora import parse_lora_paths

log = logging.getLogger("kvrelay.up")

WORKER_READY_TIMEOUT_S = 300.0
GATEWAY_READY_TIMEOUT_S = 120.0


def _worker_args(args: argparse.Namespace, role: str, model_dir: Path, port: int) -> list[str]:
    worker = [
        role,
        "--model-path",
        str(model_dir),
        "--served-model-name",
        args.served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--kv-cache-mb",
        str(args.kv_cache_mb),
        "--block-size",
        str(args.block_size),
        "--kv-transport",
        args.kv_transport,
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
    ]
    worker += ["--num-threads", str(args.num_threads)]
    worker += ["--max-prefill-tokens", str(args.max_prefill_tokens),
               "--chunked-prefill-size", str(args.chunked_prefill_size)]
    if args.colocated:
        worker += ["--colocated"]
    if args.redis_url:
        worker += ["--redis-url", args.redis_url]
    # Absolute: the workers need not share this process's working directory.
    lora_paths = [
        f"{name}={Path(path).expanduser().resolve()}"
        for name, path in parse_lora_paths(lora_paths_arg(args.lora_paths))
    ]
    if args.enable_lora or lora_paths:
        worker += ["--enable-lora", "--max-loras-per-batch", str(args.max_loras_per_batch),
                   "--max-lora-rank", str(args.max_lora_rank)]
    if lora_paths:
        worker += ["--lora-paths", *lora_paths]
    if args.enable_return_routed_experts:
        worker += ["--enable-return-routed-experts"]
    return worker


def _gateway_resilience_args(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """The gateway's fallback, overload and health flags (its secrets go into `env`)."""
    gateway = [
        "--max-concurrent-requests", str(args.max_concurrent_requests),
        "--per-key-max-concurrent", str(args.per_key_max_concurrent),
        "--per-key-rate", str(args.per_key_rate),
        "--per-key-burst", str(args.per_key_burst),
        "--health-check-interval-s", str(args.health_check_interval_s),
        "--health-check-timeout-s", str(args.health_check_timeout_s),
    ]
    if args.fallback_url:
        gateway += ["--fallback-url", args.fallback_url]
    if args.fallback_model:
        gateway += ["--fallback-model", args.fallback_model]
    if args.fallback_api_key:
        env["KVRELAY_FALLBACK_API_KEY"] = args.fallback_api_key
    return gateway


def run_cluster(args: argparse.Namespace) -> int:
    args.served_model_name = served_model_name(args.model_path, args.served_model_name)
    if not args.num_threads:
        # Workers on one machine share its cores: more torch threads than cores makes
        # every OpenMP barrier wait for a descheduled thread (measured: 5x slower decode).
        num_workers = 1 if args.colocated else args.prefill + args.decode
        args.num_threads = max(1, (os.cpu_count() or 1) // num_workers)
    # Convert (once) here, so that the workers never race to convert the same model.
    model_dir = resolve_model_dir(args.model_path)
    # The gRPC plane's and KV channel's secret: given, or made for this run. Children get it
    # through their environment, never on a command line (`ps`) or in a log line.
    secrets_env = {"KVRELAY_INTERNAL_TOKEN": args.internal_token or secrets.token_urlsafe(32)}
    children: list[ChildProcess] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not stop.is_set() and not serving.is_set():
            # Still starting: unwind at once; `finally` stops what was started.
            raise KeyboardInterrupt
        stop.set()

    serving = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    with tempfile.TemporaryDirectory(prefix="kvrelay-up-") as workdir:
        try:
            if args.redis_url is None and not args.no_redis:
                if RedisServer.available():
                    private_redis = RedisServer(Path(workdir))
                    children.append(private_redis.process)
                    private_redis.start()
                    args.redis_url = private_redis.url
                    log.info("private Redis at %s", args.redis_url)
                else:
                    log.info("no redis-server found: routing without the prefix index")
            addresses: dict[str, list[str]] = {"prefill": [], "decode": []}
            workers: list[tuple[ChildProcess, str]] = []
            roles = [("prefill", args.prefill), ("decode", args.decode)]
            if args.colocated:
                roles = [("decode", 1)]  # one process serving both roles
            for role, count in roles:
                for index in range(count):
                    port = free_port()
                    worker_args = _worker_args(args, role, model_dir, port)
                    worker_args += ["--metrics-port", str(free_port())]  # for kvrelay status
                    child = ChildProcess.kvrelay(
                        f"{role}-{index}", worker_args, env=secrets_env
                    ).start()
                    children.append(child)
                    address = f"127.0.0.1:{port}"
                    addresses[role].append(address)
                    workers.append((child, address))
            if args.colocated:
                addresses["prefill"] = addresses["decode"]
            for child, address in workers:
                child.wait_ready(partial(grpc_serving, address), WORKER_READY_TIMEOUT_S)
            gateway_args = [
                "gateway",
                "--model-path",
                str(model_dir),
                "--served-model-name",
                args.served_model_name,
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--prefill-addrs",
                ",".join(addresses["prefill"]),
                "--decode-addrs",
                ",".join(addresses["decode"]),
                "--log-level",
                args.log_level,
                "--log-format",
                args.log_format,
            ]
            gateway_env: dict[str, str] = dict(secrets_env)
            gateway_args += _gateway_resilience_args(args, gateway_env)
            if args.api_key:
                # Through the environment: a command line shows in `ps` and in debug logs.
                gateway_env["KVRELAY_API_KEY"] = args.api_key
            if args.redis_url:
                gateway_args += ["--redis-url", args.redis_url]
            if args.router_policy:
                gateway_args += ["--router-policy", args.router_policy]
            gateway_args += [
                "--router-uncached-weight",
                str(args.router_uncached_weight),
                "--router-load-weight",
                str(args.router_load_weight),
            ]
            if args.chat_template:
                gateway_args += ["--chat-template", args.chat_template]
            if args.tool_call_parser:
                gateway_args += ["--tool-call-parser", args.tool_call_parser]
            if args.reasoning_parser:
                gateway_args += ["--reasoning-parser", args.reasoning_parser]
            gateway_args += ["--max-request-body-bytes", str(args.max_request_body_bytes)]
            gateway = ChildProcess.kvrelay("gateway", gateway_args, env=gateway_env).start()
            children.append(gateway)
            health_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            gateway.wait_ready(
                lambda: http_healthy(f"http://{health_host}:{args.port}/health"),
                GATEWAY_READY_TIMEOUT_S,
            )
            log.info(
                "kvrelay is up: http://%s:%d/v1 serving %s (%s)",
                health_host,
                args.port,
                args.served_model_name,
                "colocated: 1 process for both roles"
                if args.colocated
                else f"{args.prefill} prefill, {args.decode} decode workers",
            )
            if args.redis_url:
                log.info("workers, load and KV use: kvrelay status --redis-url %s", args.redis_url)
            serving.set()
            while not stop.wait(0.5):
                dead = [c for c in children if not c.alive()]
                if dead:
                    log.error(
                        "%s exited with code %s: stopping the cluster",
                        dead[0].name,
                        dead[0].returncode(),
                    )
                    return 1
            return 0
        except ChildProcessError as exc:
            log.error("%s", exc)
            return 1
        except KeyboardInterrupt:
            log.info("interrupted while starting")
            return 1
        finally:
            log.info("stopping %d processes", len(children))
            # Gateway first (it stops taking requests), then workers, then Redis.
            for child in reversed(children):
                child.stop()
