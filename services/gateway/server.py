"""The gateway's app factory and entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from services.gateway import (
    routes_chat,
    routes_completions,
    routes_embeddings,
    routes_health,
    routes_lora,
    routes_metrics,
    routes_models,
)
from services.gateway.auth import ApiKeyMiddleware
from services.gateway.body_json import JsonBodyMiddleware
from services.gateway.body_limit import BodyLimitMiddleware
from services.gateway.chat_output import check_parser_names
from services.gateway.config import GatewayConfig
from services.gateway.errors import install_error_handlers
from services.gateway.fallback import Fallback
from services.gateway.generate import Generator
from services.gateway.limits import LimitSettings, LimitsMiddleware
from services.gateway.metrics import GatewayMetrics
from services.gateway.routing.build import build_routing
from services.gateway.state import GatewayState
from services.gateway.tokenizer import load_model_info
from services.gateway.worker_clients import WorkerPool
from shared.observability.http import EndpointNames, RequestObservabilityMiddleware

logger = logging.getLogger("kvrelay.gateway")

HEALTH_POLL_INTERVAL_S = 2.0
WORKER_INFO_INTERVAL_S = 1.0  # free KV pages of decode workers, for routing
GRACEFUL_SHUTDOWN_S = 5.0


def create_app(config: GatewayConfig) -> FastAPI:
    if not config.prefill_addrs or not config.decode_addrs:
        raise ValueError("the gateway needs at least one prefill and one decode worker address")
    check_parser_names(config.tool_call_parser, config.reasoning_parser)
    model = load_model_info(config.model_path, config.served_model_name, config.chat_template)
    pool = WorkerPool(
        config.prefill_addrs,
        config.decode_addrs,
        internal_token=config.internal_token,
        health_timeout_s=config.health_check_timeout_s,
    )
    metrics = GatewayMetrics()
    metrics.watch_pool(pool)
    routing = build_routing(config, pool, model.served_name, metrics)
    router = routing.router
    state = GatewayState(
        config=config,
        model=model,
        pool=pool,
        router=router,
        generator=Generator(model, router, config.request_timeout_s),
        metrics=metrics,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Without a lifespan (some test clients) routing still works: workers count as
        # healthy until a call fails, and /health checks on demand.
        state.loop = asyncio.get_running_loop()
        # Worker ids, block size and the model name to hash with, before the first request.
        await routing.directory.refresh()
        background = [
            asyncio.create_task(pool.health_loop(config.health_check_interval_s)),
            asyncio.create_task(routing.directory.refresh_loop(WORKER_INFO_INTERVAL_S)),
        ]
        if routing.index_health is not None:
            background.append(asyncio.create_task(routing.index_health.probe_loop()))
        logger.info(
            "gateway up: model %s, prefill %s, decode %s, routing by %s%s",
            model.served_name,
            config.prefill_addrs,
            config.decode_addrs,
            router.policy.name,
            f" (index at {config.redis_url})" if routing.reader is not None else "",
        )
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if routing.reader is not None:
                await routing.reader.close()
            await pool.close()
            if fallback is not None:
                await fallback.close()

    fallback = None
    if config.fallback_url:
        fallback = Fallback(
            config.fallback_url,
            api_key=config.fallback_api_key,
            model=config.fallback_model,
            timeout_s=config.request_timeout_s,
        )
    app = FastAPI(title="kvrelay gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state
    app.state.fallback = fallback  # read by routes_common.respond
    install_error_handlers(app)
    for module in (routes_chat, routes_completions, routes_models, routes_health, routes_metrics):
        app.include_router(module.router)
    app.include_router(routes_embeddings.router)
    app.include_router(routes_lora.router)  # with its lifespan: lists the workers' adapters
    app.add_middleware(JsonBodyMiddleware)
    # Inside the API key check: a client without the key gets its 401 before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    limits = LimitSettings(
        config.max_concurrent_requests,
        config.per_key_max_concurrent,
        config.per_key_rate,
        config.per_key_burst,
    )
    if limits.enabled:
        # Inside the API key check (a 401 before a 429), before the body is read.
        app.add_middleware(LimitsMiddleware, settings=limits)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    # Outermost: every answer (401s included) carries X-Request-Id and is counted.
    endpoints = EndpointNames(lambda: app.openapi()["paths"])  # path templates, as labels
    app.add_middleware(
        RequestObservabilityMiddleware, metrics=metrics.requests, endpoints=endpoints
    )
    return app


class _GatewayServer(uvicorn.Server):
    """uvicorn, plus: at SIGTERM, requests in flight get a grace period, then a clean 503."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state: GatewayState = self._app.state.gateway
        loop = state.loop
        if loop is not None and not loop.is_closed():
            # uvicorn stops accepting connections and waits for these requests; past the
            # grace period they are ended with an error event rather than cut off.
            loop.call_soon_threadsafe(
                loop.call_later, GRACEFUL_SHUTDOWN_S, state.generator.shutdown
            )
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once stopped, so the process dies of it (status 143);
        # after a graceful stop, serve() should rather just return.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig in captured:
            captured.remove(sig)


def serve(config: GatewayConfig) -> None:
    """Runs the gateway until SIGINT/SIGTERM, then returns after a graceful stop.

    Requests in flight get GRACEFUL_SHUTDOWN_S seconds to finish, then end with a 503.
    """
    level = getattr(logging, config.log_level.upper(), logging.INFO)
    # Libraries (grpc, asyncio) are chatty at debug level: only our own logger goes below INFO.
    logging.basicConfig(
        level=max(level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kvrelay").setLevel(level)
    app = create_app(config)
    server = _GatewayServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level.lower(),
            log_config=None,  # uvicorn's loggers write through ours (format, request id)
            # A backstop: by then Generator.shutdown() has ended every request.
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S) + 5,
        ),
        app,
    )
    server.run()
