"""The LoRA side of a worker's gRPC services (prefill, decode and colocated alike).

A request names its adapter; the service resolves the name once, and the job holds the
adapter itself from then on (see shared/model/lora_registry.py: unloading stops new
requests only). Load and unload answer with the worker's adapters after the change.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from shared.model.lora import LoraAdapter, LoraError
from shared.model.lora_registry import LoraRegistry
from shared.model.runner import ModelRunner
from shared.rpc import kvrelay_pb2 as pb

log = logging.getLogger(__name__)


def adapter_list(registry: LoraRegistry | None) -> pb.LoraAdapterList:
    if registry is None:
        return pb.LoraAdapterList(enabled=False)
    return pb.LoraAdapterList(
        enabled=True,
        adapters=[
            pb.LoraAdapter(name=a.name, path=a.path, key=a.key, rank=a.rank)
            for a in registry.adapters()
        ],
    )


async def request_adapter(
    runner: ModelRunner, name: str, context: grpc.aio.ServicerContext
) -> LoraAdapter | None:
    """The adapter a request names ("" = none); aborts the call for an unknown one."""
    if not name:
        return None
    if runner.lora is None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"LoRA adapter {name!r} asked for, but this worker runs without --enable-lora",
        )
        raise AssertionError("unreachable")  # abort raises
    try:
        return runner.lora.get(name)
    except KeyError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown LoRA adapter {name!r}")
        raise AssertionError("unreachable") from None


async def load(
    runner: ModelRunner, request: pb.LoadLoraAdapterRequest, context: grpc.aio.ServicerContext
) -> pb.LoraAdapterList:
    registry = await _registry(runner, context)
    try:
        # Reading and checking the files takes a while: not on the event loop.
        adapter = await asyncio.to_thread(registry.load, request.name, request.path)
    except LoraError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    log.info("LoRA adapter %s loaded from %s (rank %d)", adapter.name, adapter.path, adapter.rank)
    return adapter_list(registry)


async def unload(
    runner: ModelRunner, request: pb.UnloadLoraAdapterRequest, context: grpc.aio.ServicerContext
) -> pb.LoraAdapterList:
    registry = await _registry(runner, context)
    try:
        registry.unload(request.name)
    except KeyError:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no LoRA adapter {request.name!r}")
    log.info("LoRA adapter %s unloaded", request.name)
    return adapter_list(registry)


async def _registry(runner: ModelRunner, context: grpc.aio.ServicerContext) -> LoraRegistry:
    if runner.lora is None:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, "this worker runs without --enable-lora"
        )
        raise AssertionError("unreachable")
    return runner.lora


def load_startup_adapters(runner: ModelRunner, lora_paths: list[tuple[str, str]]) -> None:
    """--lora-paths, before the worker serves: a bad adapter stops it with the reason."""
    assert runner.lora is not None
    for name, path in lora_paths:
        adapter = runner.lora.load(name, path)
        log.info("LoRA adapter %s from %s (rank %d)", name, adapter.path, adapter.rank)


class LoraAdminServicer:
    """The LoRA admin calls of a worker, shared by the prefill, decode and colocated
    servicers (mixed in before their generated base class)."""

    def lora_runner(self) -> ModelRunner:
        raise NotImplementedError

    async def LoadLoraAdapter(
        self, request: pb.LoadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoraAdapterList:
        return await load(self.lora_runner(), request, context)

    async def UnloadLoraAdapter(
        self, request: pb.UnloadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoraAdapterList:
        return await unload(self.lora_runner(), request, context)

    async def ListLoraAdapters(
        self, request: pb.ListLoraAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoraAdapterList:
        return adapter_list(self.lora_runner().lora)
