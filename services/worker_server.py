"""Runs one prefill or decode worker: model, KV pool, transfer, gRPC server, health."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.decode.colocated_prefill import ColocatedPrefillService
from services.decode.engine import DecodeEngine
from services.decode.service import DecodeService
from services.prefill.engine import PrefillEngine, PrefillLimits
from services.prefill.service import PrefillService
from shared.config import WorkerConfig, served_model_name
from shared.model.loader import resolve_model_dir
from shared.model.runner import ModelRunner
from shared.prefix_cache import PrefixCache
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.transfer import make_receiver, make_sender
from shared.transfer.local_transport import LocalKvReceiver

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def run_worker(config: WorkerConfig) -> None:
    asyncio.run(_serve(config))


async def _serve(config: WorkerConfig) -> None:
    if not config.worker_id:
        config.worker_id = f"{config.role}-{uuid.uuid4().hex[:8]}"
    model_dir = resolve_model_dir(config.model_path)
    runner = ModelRunner(
        model_dir,
        dtype=config.torch_dtype,
        kv_cache_mb=config.kv_cache_mb,
        page_size=config.block_size,
        num_threads=config.num_threads,
    )
    model_name = served_model_name(config.model_path, config.served_model_name)
    server = grpc.aio.server(options=GRPC_OPTIONS)
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
    await stop.wait()
    log.info("%s worker %s stopping", config.role, config.worker_id)
    await health.enter_graceful_shutdown()
    await server.stop(grace=5)
    service.close()


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
    engine = PrefillEngine(runner, make_sender(config.kv_transport), model_name, cache, limits)
    engine.start()
    if publisher is not None:
        publisher.set_snapshot(cache.snapshot)
        publisher.start()
    return PrefillService(config, engine, model_name, publisher)


def _decode_service(config: WorkerConfig, runner: ModelRunner, model_name: str) -> DecodeService:
    receiver = make_receiver(
        config.kv_transport, runner.pool, config.host, config.kv_port, config.public_host,
        worker_id=config.worker_id,
    )
    engine = DecodeEngine(runner, config.max_prefill_tokens, config.chunked_prefill_size)
    engine.start()
    return DecodeService(config, engine, receiver, model_name)
