"""The prefill face of a colocated worker: prompts computed by the decode engine itself.

`kvrelay up --colocated` runs workers that serve both PrefillWorker and DecodeWorker over
one gRPC port, one model and one KV pool. The gateway's flow is unchanged (reserve on
decode, prefill into the reservation, stream), but the prefill is a chunk of the decode
engine's mixed steps, written straight into the reserved pages.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from services.decode.engine import DecodeEngine, LocalPrefill
from services.lora import worker_rpc as lora_rpc
from services.prefill import embed
from services.worker_info import worker_info
from shared.config import WorkerConfig
from shared.kv_pool import KVPoolExhausted
from shared.model.runner import ModelRunner
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_from_pb, top_logprobs_to_pb
from shared.transfer.base import KvArrival
from shared.transfer.local_transport import LocalKvReceiver

log = logging.getLogger(__name__)


def _int32_bytes(chunks: list[torch.Tensor] | None) -> bytes:
    """The prompt's routed experts, as PrefillResponse carries them (b"" if not asked)."""
    if not chunks:
        return b""
    return torch.cat(chunks).numpy().astype("<i4", copy=False).tobytes()


class ColocatedPrefillService(lora_rpc.LoraAdminServicer, pb_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: DecodeEngine,
        receiver: LocalKvReceiver,
        model_name: str,
    ) -> None:
        self.config = config
        self.engine = engine
        self.receiver = receiver
        self.model_name = model_name
        self.pooling = embed.Pooling.for_model(engine.runner.model_dir)

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        request_id = request.request_id
        prompt = [int(t) for t in request.prompt_token_ids]
        pool = self.engine.runner.pool
        if not prompt or len(prompt) >= self.engine.runner.config.max_context:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt does not fit")
        try:
            params = sampling_from_pb(request.sampling)
            if params.grammar is not None:
                await asyncio.to_thread(self.engine.grammars.compile, params.grammar)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling parameters: {exc}")
        if params.return_routed_experts and (why := self.engine.runner.routed_experts_refusal()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        lora = await lora_rpc.request_adapter(self.engine.runner, request.lora, context)
        try:
            if request.HasField("kv_target"):
                pages = self.receiver.take_reservation(request_id)
            else:
                pages = pool.allocate(pool.pages_for(len(prompt)))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except KVPoolExhausted as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        loop = asyncio.get_running_loop()
        result: asyncio.Future[tuple[list[int], list[float]]] = loop.create_future()

        def done(tokens: list[int], logprobs: list[float], error: str | None) -> None:
            # Called once, by the engine thread, after the last step that wrote the pages:
            # only then may our reference go.
            pool.free(pages)

            def resolve() -> None:
                if result.done():
                    return
                if error is None:
                    result.set_result((tokens, logprobs))
                else:
                    result.set_exception(RuntimeError(error))

            loop.call_soon_threadsafe(resolve)

        task = LocalPrefill(request_id, prompt, pages, params, done, lora=lora)
        if params.return_routed_experts:
            task.routed_experts = []
        self.engine.submit_prefill(task)
        try:
            tokens, logprobs = await result
        except asyncio.CancelledError:
            self.engine.abort(request_id)
            raise
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if request.HasField("kv_target"):
            self.receiver.complete(request_id, KvArrival(len(prompt), tokens, logprobs))
        return pb.PrefillResponse(
            first_token_ids=tokens,
            first_token_logprobs=logprobs,
            prompt_tokens=len(prompt),
            first_token_top_logprobs=[top_logprobs_to_pb(t) for t in task.first_token_top_logprobs],
            routed_experts=_int32_bytes(task.routed_experts),
        )

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        engine = self.engine
        return await embed.serve(
            request,
            context,
            engine.runner,
            engine.run_on_engine,
            self.pooling,
            engine.runner.pool.allocate,
            engine.max_prefill_tokens,
            engine.chunked_prefill_size,
        )

    def lora_runner(self) -> ModelRunner:
        return self.engine.runner

    async def GetInfo(
        self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        info = worker_info(
            self.config, self.engine.runner, self.model_name, kv_endpoint=self.receiver.endpoint
        )
        info.role = "colocated"
        return info

    def close(self) -> None:
        pass
