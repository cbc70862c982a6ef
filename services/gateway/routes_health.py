"""GET /health: ready when one prefill and one decode worker answer gRPC health SERVING."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.state import get_state

router = APIRouter()


@router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    report = await get_state(request).pool.refresh_health()
    body = {
        "status": "ok" if report.ready else "unavailable",
        "prefill": report.prefill,
        "decode": report.decode,
    }
    return JSONResponse(body, status_code=200 if report.ready else 503)
