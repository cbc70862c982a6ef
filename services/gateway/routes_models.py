"""GET /v1/models, GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.errors import OPENAPI_ERRORS
from services.gateway.protocol import ModelCard, ModelList
from services.gateway.routes_lora import adapter_card, adapter_cards
from services.gateway.state import GatewayState, get_state

router = APIRouter()


def _card(state: GatewayState) -> ModelCard:
    return ModelCard(
        id=state.model.served_name, created=state.created, max_model_len=state.model.max_context
    )


@router.get("/v1/models", response_model=None, responses={401: OPENAPI_ERRORS[401]})
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    listing = ModelList(data=[_card(state), *adapter_cards(state)])
    # serialize_as_any: adapter cards add their own fields (parent, root).
    return JSONResponse(listing.model_dump(mode="json", serialize_as_any=True))


@router.get(
    "/v1/models/{model_id:path}",
    response_model=None,
    responses={code: OPENAPI_ERRORS[code] for code in (401, 404)},
)
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    state.check_model(model_id)
    card = adapter_card(state, model_id) or _card(state)
    return JSONResponse(card.model_dump(mode="json"))
