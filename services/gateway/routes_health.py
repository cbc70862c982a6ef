"""GET /health: one prefill and one decode worker answer gRPC health SERVING.
GET /health_generate: a real generation through prefill -> KV relay -> decode works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.errors import UNAVAILABLE, APIError, error_response
from services.gateway.generate import Finished
from services.gateway.sampling import GenerationPlan, new_request_id
from services.gateway.state import GatewayState, get_state

logger = logging.getLogger("kvrelay.gateway")

router = APIRouter()

HEALTH_GENERATE_TIMEOUT_S = 20.0


@router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    report = await get_state(request).pool.refresh_health()
    body = {
        "status": "ok" if report.ready else "unavailable",
        "prefill": report.prefill,
        "decode": report.decode,
    }
    return JSONResponse(body, status_code=200 if report.ready else 503)


def _probe_plan(state: GatewayState) -> GenerationPlan:
    # Two tokens whatever they are (no stop ids): prefill samples the first, decode the second,
    # so the KV relay between them is part of the check.
    return GenerationPlan(
        request_id=new_request_id("health"),
        prompt_token_ids=state.model.encode_prompt("ping")[-8:],
        max_new_tokens=2,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        stop_token_ids=(),
        stop_strings=(),
    )


async def _generate(state: GatewayState, plan: GenerationPlan) -> Finished:
    finished: Finished | None = None
    async with aclosing(state.generator.generate(plan)) as events:
        async for event in events:
            if isinstance(event, Finished):
                finished = event
    if finished is None:
        raise APIError(503, "the probe generation ended without finishing", type=UNAVAILABLE)
    return finished


@router.get("/health_generate", response_model=None)
async def health_generate(request: Request) -> JSONResponse:
    state = get_state(request)
    plan = _probe_plan(state)
    started = time.monotonic()
    try:
        finished = await asyncio.wait_for(_generate(state, plan), HEALTH_GENERATE_TIMEOUT_S)
    except TimeoutError:
        err = APIError(
            503,
            f"no answer to a probe generation within {HEALTH_GENERATE_TIMEOUT_S:.0f} s",
            type=UNAVAILABLE,
            code="health_generate_timeout",
        )
    except APIError as exc:
        err = APIError(
            503, f"probe generation failed: {exc.message}", type=UNAVAILABLE, code=exc.code
        )
    else:
        return JSONResponse(
            {
                "status": "ok",
                "completion_tokens": finished.completion_tokens,
                "latency_ms": round((time.monotonic() - started) * 1000, 1),
            }
        )
    logger.warning("%s: %s", plan.request_id, err.message)
    return error_response(err)
