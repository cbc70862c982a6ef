"""Runs one prefill or decode worker: model, KV pool, transfer, gRPC server, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.auth_interceptor import InternalTokenInterceptor
from services.decode.colocated_prefill import ColocatedPrefillService
from services.decode.engine import DecodeEngine
from services.decode.service import DecodeService
from services.drain import DrainInterceptor
from services.lora.worker_rpc import load_startup_adapters
from services.prefill.engine import PrefillEngine, PrefillLimits
from services.prefill.service import PrefillService
from shared.config import WorkerConfig, served_model_name
from shared.model.loader import resolve_model_dir
from shared.model.lora import parse_lora_paths
from shared.model.runner import ModelRunner
from shared.observability.endpoints import EndpointAnnouncer, WorkerEndpoint
from shared.observability.metered_runner import MeteredRunner
from shared.observability.metrics_server import MetricsServer
from shared.observability.worker_metrics import WorkerProbe, worker_metrics
from shared.prefix_cache import PrefixCache
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.transfer import make_receiver, make_sender
from shared.transfer.local_transport import LocalKvReceiver
from shared.transfer.zmq_transport import flush_queued_kv

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


ENGINE_CHECK_S = 1.0  # how often the worker checks that its engine thread still runs


def run_worker(config: WorkerConfig) -> int:
    """Serves until SIGTERM/SIGINT (0), or until its engine thread dies (1)."""
    return asyncio.run(_serve(config))


async def _serve(config: WorkerConfig) -> int:
    if not config.worker_id:
        config.worker_id = f"{config.role}-{uuid.uuid4().hex[:8]}"
    model_dir = resolve_model_dir(config.model_path)
    runner = MeteredRunner(
        model_dir,
        role=config.role,
        dtype=config.torch_dtype,
        kv_cache_mb=config.kv_cache_mb,
        page_size=config.block_size,
        num_threads=config.num_threads,
    )
    if config.enable_lora or config.lora_paths:
        runner.enable_lora(config.max_loras_per_batch, config.max_lora_rank)
        load_startup_adapters(runner, parse_lora_paths(config.lora_paths))
    if config.enable_return_routed_experts and not runner.enable_routed_experts():
        log.warning("--enable-return-routed-experts: %s", runner.routed_experts_refusal())
    model_name = served_model_name(config.model_path, config.served_model_name)
    drain = DrainInterceptor(config.worker_id)
    interceptors: list[grpc.aio.ServerInterceptor] = [drain]
    if config.internal_token:
        # Outermost: a caller without the token is refused before anything else runs.
        interceptors.insert(0, InternalTokenInterceptor(config.internal_token))
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service: PrefillService | DecodeService
    if config.role == "prefill":
        service = _prefill_service(config, runner, model_name, f"{config.public_host}:{port}")
        pb_grpc.add_PrefillWorkerServicer_to_server(service, server)
        service_name = "kvrelay.v1.PrefillWorker"
    elif config.role == "decode":
        service = _decode_service(config, runner, model_name)
        pb_grpc.add_DecodeWorkerServicer_to_server(service, server)
        service_name = "kvrelay.v1.DecodeWorker"
        if config.colocated:
            assert isinstance(service.receiver, LocalKvReceiver)
            pb_grpc.add_PrefillWorkerServicer_to_server(
                ColocatedPrefillService(config, service.engine, service.receiver, model_name),
                server,
            )
    else:
        raise ValueError(f"unknown worker role {config.role!r}")
    await server.start()
    address = f"{config.public_host}:{port}"
    metrics_server, announcer = _observe(config, service, model_name, address)
    for name in ("", service_name):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "%s worker %s serving %s on %s:%d (%d KV pages of %d tokens, %s)",
        config.role,
        config.worker_id,
        model_name,
        config.host,
        port,
        runner.pool.num_pages,
        runner.pool.page_size,
        config.dtype,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    exit_code = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ENGINE_CHECK_S)
        if not service.engine.is_alive():
            # Its calls would wait forever while health checks say SERVING: stop instead.
            log.error("%s worker %s: the engine thread died; stopping", config.role,
                      config.worker_id)
            exit_code = 1
            break
    # Drain: refuse new calls (health NOT_SERVING, leave the index so gateways route
    # elsewhere at once), let the calls in flight finish, then stop.
    log.info("%s worker %s draining: %d calls in flight, up to %.0f s",
             config.role, config.worker_id, drain.in_flight, config.drain_timeout_s)
    drain.start()
    await health.enter_graceful_shutdown()
    if announcer is not None:
        announcer.close()
        announcer = None
    if isinstance(service, PrefillService) and service.publisher is not None:
        await asyncio.to_thread(service.publisher.close)
        service.publisher = None
    if not await drain.wait_idle(config.drain_timeout_s):
        log.warning("%s worker %s: %d calls still in flight after %.0f s: cancelling them",
                    config.role, config.worker_id, drain.in_flight, config.drain_timeout_s)
    log.info("%s worker %s stopping", config.role, config.worker_id)
    await server.stop(grace=1)
    service.close()
    if not await asyncio.to_thread(flush_queued_kv, config.kv_send_timeout_s):
        log.warning("%s worker %s: ZeroMQ not done after %.0f s (KV still queued, or a "
                    "socket left open); exiting anyway",
                    config.role, config.worker_id, config.kv_send_timeout_s)
    if announcer is not None:
        announcer.close()
    if metrics_server is not None:
        metrics_server.close()
    return exit_code


def _observe(
    config: WorkerConfig, service: PrefillService | DecodeService, model_name: str, address: str
) -> tuple[MetricsServer | None, EndpointAnnouncer | None]:
    """Metrics of this worker on --metrics-port, and where to find them in Redis."""
    worker_metrics().bind(_probe(config, service, model_name, address))
    metrics_server = None
    metrics_url = ""
    if config.metrics_port:
        metrics_server = MetricsServer(worker_metrics().registry, config.host, config.metrics_port)
        metrics_url = metrics_server.url(config.public_host)
        log.info("metrics at %s", metrics_url)
    announcer = None
    if config.redis_url:
        endpoint = WorkerEndpoint(config.worker_id, config.role, address, metrics_url, time.time())
        announcer = EndpointAnnouncer(config.redis_url, endpoint).start()
    return metrics_server, announcer


def _probe(
    config: WorkerConfig, service: PrefillService | DecodeService, model_name: str, address: str
) -> WorkerProbe:
    if isinstance(service, PrefillService):
        prefill, cache = service.engine, service.engine.cache
        return WorkerProbe(
            config.role, config.worker_id, model_name, address, prefill.runner.pool,
            running=lambda: len(prefill._running),
            queued=lambda: max(prefill.num_queued - len(prefill._running), 0),
            cached_pages=cache.num_idle_pages,
            hit_rate=lambda: cache.hit_rate,
        )
    decode, receiver, admission = service.engine, service.receiver, service.admission
    return WorkerProbe(
        config.role, config.worker_id, model_name, address, decode.runner.pool,
        # Holding pages: waiting for their KV, decoding, or preempted (to resume).
        running=lambda: (
            receiver.num_expected + len(decode._running) + len(decode._inbox)
            + len(decode._preempted)
        ),
        queued=lambda: admission.num_waiting,
    )


def _prefill_service(
    config: WorkerConfig, runner: ModelRunner, model_name: str, grpc_address: str
) -> PrefillService:
    publisher = None
    if config.redis_url:
        # Announces the prefix cache's blocks so gateways can route prompts to them.
        from shared.prefix_index import PrefixIndexPublisher

        publisher = PrefixIndexPublisher(config.redis_url, config.worker_id, grpc_address)
    cache = PrefixCache(
        runner.pool,
        on_stored=publisher.blocks_stored if publisher else None,
        on_removed=publisher.blocks_removed if publisher else None,
    )
    limits = PrefillLimits(config.max_prefill_tokens, config.chunked_prefill_size)
    sender = make_sender(
        config.kv_transport, runner.pool, config.worker_id,
        internal_token=config.internal_token, send_timeout_s=config.kv_send_timeout_s,
    )
    engine = PrefillEngine(runner, sender, model_name, cache, limits)
    engine.start()
    if publisher is not None:
        publisher.set_snapshot(cache.snapshot)
        publisher.start()
    return PrefillService(config, engine, model_name, publisher)


def _decode_service(config: WorkerConfig, runner: ModelRunner, model_name: str) -> DecodeService:
    receiver = make_receiver(
        config.kv_transport, runner.pool, config.host, config.kv_port, config.public_host,
        worker_id=config.worker_id, internal_token=config.internal_token,
    )
    engine = DecodeEngine(runner, config.max_prefill_tokens, config.chunked_prefill_size)
    engine.start()
    return DecodeService(config, engine, receiver, model_name)
