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

from services.decode.engine import DecodeEngine, LocalPrefill
from services.worker_info import worker_info
from shared.config import WorkerConfig
from shared.kv_pool import KVPoolExhausted
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_from_pb
from shared.transfer.base import KvArrival
from shared.transfer.local_transport import LocalKvReceiver

log = logging.getLogger(__name__)


class ColocatedPrefillService(pb_grpc.PrefillWorkerServicer):
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
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling parameters: {exc}")
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
        result: asyncio.Future[tuple[int, float]] = loop.create_future()

        def done(token: int, logprob: float, error: str | None) -> None:
            # Called once, by the engine thread, after the last step that wrote the pages:
            # only then may our reference go.
            pool.free(pages)

            def resolve() -> None:
                if result.done():
                    return
                if error is None:
                    result.set_result((token, logprob))
                else:
                    result.set_exception(RuntimeError(error))

            loop.call_soon_threadsafe(resolve)

        self.engine.submit_prefill(LocalPrefill(request_id, prompt, pages, params, done))
        try:
            token, logprob = await result
        except asyncio.CancelledError:
            self.engine.abort(request_id)
            raise
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if request.HasField("kv_target"):
            self.receiver.complete(request_id, KvArrival(len(prompt), token, logprob))
        return pb.PrefillResponse(
            first_token_id=token, first_token_logprob=logprob, prompt_tokens=len(prompt)
        )

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
