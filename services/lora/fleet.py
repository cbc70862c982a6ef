"""The gateway's LoRA calls to every worker: list, load (all or none), unload.

A worker serving both roles (colocated) is called once. Loading is all or nothing: when
a worker refuses, those that had just loaded the adapter unload it again, and the answer
is the refusal. Unloading stops new requests at once (the gateway hides the name first);
requests already running finish with the adapter they started with.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio

from services.gateway.errors import NOT_FOUND, UNAVAILABLE, APIError
from services.gateway.worker_clients import WorkerClient, WorkerPool
from services.lora.catalog import AdapterEntry, LoraCatalog
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc

logger = logging.getLogger("kvrelay.gateway")

LIST_TIMEOUT_S = 2.0
LOAD_TIMEOUT_S = 120.0  # a large adapter is read from disk and checked by each worker

_CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


def _workers(pool: WorkerPool) -> list[WorkerClient]:
    seen: dict[str, WorkerClient] = {}
    for client in pool.workers:
        seen.setdefault(client.addr, client)
    return list(seen.values())


def _stub(client: WorkerClient) -> pb_grpc.PrefillWorkerStub | pb_grpc.DecodeWorkerStub:
    return client.prefill_stub() if client.role == "prefill" else client.decode_stub()


def _entries(answer: pb.LoraAdapterList) -> list[AdapterEntry]:
    return [AdapterEntry(a.name, a.path, a.key, a.rank) for a in answer.adapters]


def _api_error(client: WorkerClient, exc: grpc.aio.AioRpcError) -> APIError:
    code, details = exc.code(), exc.details() or exc.code().name
    message = f"{client!r}: {details}"
    if code in _CLIENT_CODES:
        return APIError(400, message, param="lora_path", code=code.name.lower())
    if code == grpc.StatusCode.NOT_FOUND:
        return APIError(404, message, type=NOT_FOUND, param="lora_name", code="lora_not_found")
    return APIError(503, message, type=UNAVAILABLE, code=code.name.lower())


async def refresh(pool: WorkerPool, catalog: LoraCatalog) -> None:
    """Asks every worker what it serves; a worker that does not answer keeps its last report."""
    asked_at = catalog.generation
    clients = _workers(pool)
    answers = await asyncio.gather(
        *(
            _stub(c).ListLoraAdapters(
                pb.ListLoraAdaptersRequest(), timeout=LIST_TIMEOUT_S, metadata=c.metadata()
            )
            for c in clients
        ),
        return_exceptions=True,
    )
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, pb.LoraAdapterList):
            catalog.report(client.addr, answer.enabled, _entries(answer), asked_at=asked_at)
        elif isinstance(answer, grpc.aio.AioRpcError):
            logger.debug("%r: ListLoraAdapters failed: %s", client, answer.code().name)
        elif isinstance(answer, BaseException):
            raise answer


async def refresh_loop(pool: WorkerPool, catalog: LoraCatalog, interval_s: float) -> None:
    while True:
        try:
            await refresh(pool, catalog)
        except Exception:
            logger.exception("LoRA adapter listing failed")
        await asyncio.sleep(interval_s)


async def load(pool: WorkerPool, catalog: LoraCatalog, name: str, path: str) -> AdapterEntry:
    clients = _workers(pool)
    had = {c.addr for c in clients if catalog.worker_has(c.addr, name)}
    request = pb.LoadLoraAdapterRequest(name=name, path=path)
    answers = await asyncio.gather(
        *(
            _stub(c).LoadLoraAdapter(request, timeout=LOAD_TIMEOUT_S, metadata=c.metadata())
            for c in clients
        ),
        return_exceptions=True,
    )
    failure: APIError | None = None
    loaded: list[WorkerClient] = []
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, pb.LoraAdapterList):
            catalog.report(client.addr, answer.enabled, _entries(answer))
            loaded.append(client)
        elif isinstance(answer, grpc.aio.AioRpcError):
            failure = failure or _api_error(client, answer)
        elif isinstance(answer, BaseException):
            raise answer
    if failure is not None:
        rollback = [c for c in loaded if c.addr not in had]
        if rollback:
            logger.warning(
                "LoRA adapter %s: loading failed (%s); unloading it again from %s",
                name,
                failure.message,
                [c.addr for c in rollback],
            )
            await _unload_from(rollback, catalog, name)
        raise failure
    entry = catalog.get(name)
    if entry is None:
        raise APIError(
            400,
            f"the workers read different files at {path!r}: LoRA adapter {name!r} not served",
            param="lora_path",
            code="lora_conflict",
        )
    logger.info("LoRA adapter %s loaded from %s on %d workers", name, path, len(clients))
    return entry


async def unload(pool: WorkerPool, catalog: LoraCatalog, name: str) -> None:
    if catalog.get(name) is None and not catalog.known_anywhere(name):
        raise APIError(
            404,
            f"no LoRA adapter {name!r} is loaded",
            type=NOT_FOUND,
            param="lora_name",
            code="lora_not_found",
        )
    catalog.hide(name)  # new requests stop now, before any worker drops it
    try:
        errors = await _unload_from(_workers(pool), catalog, name)
    finally:
        # Workers that still have it keep it out of the listing (not served by all).
        catalog.unhide(name)
    if errors:
        raise errors[0]
    logger.info("LoRA adapter %s unloaded", name)


async def _unload_from(
    clients: list[WorkerClient], catalog: LoraCatalog, name: str
) -> list[APIError]:
    request = pb.UnloadLoraAdapterRequest(name=name)
    answers = await asyncio.gather(
        *(
            _stub(c).UnloadLoraAdapter(request, timeout=LIST_TIMEOUT_S, metadata=c.metadata())
            for c in clients
        ),
        return_exceptions=True,
    )
    errors: list[APIError] = []
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, pb.LoraAdapterList):
            catalog.report(client.addr, answer.enabled, _entries(answer))
        elif isinstance(answer, grpc.aio.AioRpcError):
            if answer.code() == grpc.StatusCode.NOT_FOUND:
                continue  # not there: what unloading wants
            errors.append(_api_error(client, answer))
        elif isinstance(answer, BaseException):
            raise answer
    return errors
