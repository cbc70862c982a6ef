"""What the route handlers share: the model, the workers, the router, the generator."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request

from services.gateway.config import GatewayConfig
from services.gateway.errors import NOT_FOUND, APIError
from services.gateway.generate import Generator
from services.gateway.metrics import GatewayMetrics
from services.gateway.router import Router
from services.gateway.tokenizer import ModelInfo
from services.gateway.worker_clients import WorkerPool


@dataclass
class GatewayState:
    config: GatewayConfig
    model: ModelInfo
    pool: WorkerPool
    router: Router
    generator: Generator
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once it runs

    def check_model(self, name: str | None) -> None:
        if not self.model.accepts(name):
            adapters = [e.name for e in self.model.adapters.entries()]
            also = f" and the LoRA adapters {adapters}" if adapters else ""
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{self.model.served_name!r}{also}",
                type=NOT_FOUND,
                param="model",
                code="model_not_found",
            )


def get_state(request: Request) -> GatewayState:
    state = request.app.state.gateway
    assert isinstance(state, GatewayState)
    return state
