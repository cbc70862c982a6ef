"""POST /v1/load_lora_adapter, /v1/unload_lora_adapter; LoRA adapters in /v1/models.

Requests pick an adapter with `model: "adapter"` or `"base:adapter"`. The adapters served
are those every worker has loaded (services/lora/catalog.py): listed from the workers at
start and every few seconds, and changed here on all workers at once (services/lora/fleet.py).
Unloading an adapter that requests are using does not wait and is not refused: new requests
get a 404 at once, those already running finish with the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.errors import OPENAPI_ERRORS, APIError, bad_request
from services.gateway.protocol import ModelCard
from services.gateway.state import GatewayState, get_state
from services.lora import fleet
from services.lora.catalog import AdapterEntry
from shared.model.lora import LoraError, check_adapter_name

REFRESH_INTERVAL_S = 2.0


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs inside the app's own lifespan: the adapters are known before the first request.
    state: GatewayState = app.state.gateway
    catalog = state.model.adapters
    await fleet.refresh(state.pool, catalog)
    task = asyncio.create_task(fleet.refresh_loop(state.pool, catalog, REFRESH_INTERVAL_S))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(lifespan=_lifespan)


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)  # a PEFT directory, on the workers


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)


class LoraModelCard(ModelCard):
    """An adapter in /v1/models: its base model (`parent`) and its files (`root`)."""

    parent: str
    root: str


def _card(state: GatewayState, entry: AdapterEntry) -> LoraModelCard:
    return LoraModelCard(
        id=entry.name,
        created=state.created,
        max_model_len=state.model.max_context,
        parent=state.model.served_name,
        root=entry.path,
    )


def adapter_cards(state: GatewayState) -> list[ModelCard]:
    return [_card(state, entry) for entry in state.model.adapters.entries()]


def adapter_card(state: GatewayState, model_id: str) -> ModelCard | None:
    entry = state.model.adapter_for(model_id)
    return None if entry is None else _card(state, entry)


def _loaded(state: GatewayState) -> dict[str, str]:
    return {e.name: e.path for e in state.model.adapters.entries()}


@router.post("/v1/load_lora_adapter", response_model=None, responses=OPENAPI_ERRORS)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    catalog = state.model.adapters
    name = body.lora_name
    try:
        check_adapter_name(name)
    except LoraError as exc:
        raise bad_request(str(exc), "lora_name") from None
    if name in state.model.accepted_names:
        raise bad_request(f"{name!r} is the base model's name", "lora_name")
    if not catalog.enabled:
        raise bad_request(
            "LoRA adapters are not enabled: start the workers with --enable-lora", "lora_name"
        )
    current = catalog.get(name)
    if current is not None and current.path != body.lora_path:
        raise APIError(
            400,
            f"a LoRA adapter named {name!r} is already loaded from {current.path}; unload it first",
            param="lora_name",
            code="lora_already_loaded",
        )
    entry = await fleet.load(state.pool, catalog, name, body.lora_path)
    return JSONResponse(
        {
            "success": True,
            "message": f"LoRA adapter {entry.name!r} loaded (rank {entry.rank})",
            "loaded_adapters": _loaded(state),
        }
    )


@router.post("/v1/unload_lora_adapter", response_model=None, responses=OPENAPI_ERRORS)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    await fleet.unload(state.pool, state.model.adapters, body.lora_name)
    return JSONResponse(
        {
            "success": True,
            "message": f"LoRA adapter {body.lora_name!r} unloaded",
            "loaded_adapters": _loaded(state),
        }
    )
