"""GET /v1/models, GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.protocol import ModelCard, ModelList
from services.gateway.state import GatewayState, get_state

router = APIRouter()


def _card(state: GatewayState) -> ModelCard:
    return ModelCard(
        id=state.model.served_name, created=state.created, max_model_len=state.model.max_context
    )


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> JSONResponse:
    listing = ModelList(data=[_card(get_state(request))])
    return JSONResponse(listing.model_dump(mode="json"))


@router.get("/v1/models/{model_id:path}", response_model=None)
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    state.check_model(model_id)
    return JSONResponse(_card(state).model_dump(mode="json"))
