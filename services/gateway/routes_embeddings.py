"""POST /v1/embeddings: computed on a prefill worker (Embed), pooled as the model says.

Inputs are a text, texts, token ids or lists of token ids; texts are tokenized as
completions prompts are (with BOS when the tokenizer adds one). `encoding_format: base64`
gives each vector as base64 of little-endian float32, as OpenAI's API does.
"""

from __future__ import annotations

import base64
import time
from functools import lru_cache
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.errors import OPENAPI_ERRORS, APIError, bad_request, not_supported
from services.gateway.generate import WorkerFailure, rpc_error_to_api
from services.gateway.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from services.gateway.sampling import new_request_id
from services.gateway.state import GatewayState, get_state
from services.gateway.worker_clients import WorkerClient
from shared.model.config import ModelConfig
from shared.observability.request_id import grpc_metadata, traced_request_id
from shared.rpc import kvrelay_pb2 as pb

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
MAX_ATTEMPTS = 2  # a second prefill worker when the first is unavailable


@lru_cache(maxsize=4)
def _hidden_size(model_dir: Path) -> int:
    return ModelConfig.from_dir(model_dir).hidden_size


def _inputs(state: GatewayState, body: EmbeddingRequest) -> list[list[int]]:
    raw = body.input
    items: list[str] | list[list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [[int(x) for x in raw if isinstance(x, int)]]
    else:
        items = raw  # type: ignore[assignment]  # texts, or lists of token ids
    if not items:
        raise bad_request("input is empty: give a text, texts or token ids", "input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(items)}", "input")
    prompts: list[list[int]] = []
    for item in items:
        ids = state.model.encode_prompt(item) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request("an input is empty (0 tokens)", "input")
        if len(ids) > state.model.max_context:
            raise bad_request(
                f"an input has {len(ids)} tokens, more than the model's context of "
                f"{state.model.max_context}",
                "input",
            )
        state.model.check_token_ids(ids, "input")
        prompts.append(ids)
    return prompts


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


@router.post("/v1/embeddings", response_model=None, responses=OPENAPI_ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    state.check_model(body.model)
    if state.model.adapter_for(body.model) is not None:
        raise not_supported("embeddings through a LoRA adapter", "model")
    size = _hidden_size(state.model.model_dir)
    if body.dimensions is not None and body.dimensions != size:
        raise bad_request(
            f"dimensions {body.dimensions}: this model's embeddings have {size} dimensions "
            "and cannot be shortened",
            "dimensions",
        )
    prompts = _inputs(state, body)
    reply = await _embed(state, prompts, new_request_id("embd"))
    if len(reply.embeddings) != len(prompts):
        raise APIError(500, f"the worker returned {len(reply.embeddings)} embeddings")
    response = EmbeddingResponse(
        data=[
            EmbeddingData(index=i, embedding=_encode(list(e.values), body.encoding_format))
            for i, e in enumerate(reply.embeddings)
        ],
        model=body.model or state.model.served_name,
        usage=EmbeddingUsage(prompt_tokens=reply.prompt_tokens, total_tokens=reply.prompt_tokens),
    )
    return JSONResponse(response.model_dump(mode="json"))


async def _embed(
    state: GatewayState, prompts: list[list[int]], request_id: str
) -> pb.EmbedResponse:
    deadline = time.monotonic() + state.config.request_timeout_s
    failed: set[WorkerClient] = set()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        route = await state.router.route(prompts[0], needs_decode=False, exclude=failed)
        try:
            call = route.prefill.prefill_stub().Embed(
                pb.EmbedRequest(
                    request_id=traced_request_id(request_id),
                    inputs=[pb.TokenIds(token_ids=p) for p in prompts],
                ),
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=route.prefill.metadata(grpc_metadata()),
            )
            reply: pb.EmbedResponse = await call
            return reply
        except grpc.aio.AioRpcError as exc:
            err = rpc_error_to_api(route.prefill, exc)
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                err = not_supported(f"embeddings on {route.prefill!r}", "input")
            if not isinstance(err, WorkerFailure) or attempt == MAX_ATTEMPTS:
                raise err from exc
            failed.add(err.worker)
        finally:
            route.release()
    raise AssertionError("unreachable")
