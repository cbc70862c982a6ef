"""gRPC face of a decode worker: reserve pages, await the KV, stream the answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from services.decode.admission import AdmissionRejected, PageAdmission
from services.decode.engine import DecodeEngine, DecodeSequence, TokenEvent
from services.worker_info import worker_info
from shared.config import WorkerConfig
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_from_pb
from shared.transfer import KvReceiver, KvTransferError

log = logging.getLogger(__name__)


class DecodeService(pb_grpc.DecodeWorkerServicer):
    def __init__(
        self, config: WorkerConfig, engine: DecodeEngine, receiver: KvReceiver, model_name: str
    ) -> None:
        self.config = config
        self.engine = engine
        self.receiver = receiver
        self.model_name = model_name
        self.admission = PageAdmission(
            engine.runner.pool,
            max_waiting=config.max_queued_requests,
            headroom_pages=engine.pages_owed,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        request_id = request.request_id
        prompt = [int(t) for t in request.prompt_token_ids]
        try:
            params = sampling_from_pb(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling parameters: {exc}")
        runner = self.engine.runner
        pool = runner.pool
        if not prompt or len(prompt) >= runner.config.max_context:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(prompt)} tokens does not fit the context of "
                f"{runner.config.max_context}",
            )
        try:
            pages = await self.admission.reserve(
                pool.pages_for(len(prompt)), self.config.queue_timeout_s
            )
        except AdmissionRejected as exc:
            code = (
                grpc.StatusCode.INVALID_ARGUMENT if exc.ever else grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            await context.abort(code, f"decode worker {self.config.worker_id}: {exc}")
        submitted = False
        try:
            arrival_future = self.receiver.expect(request_id, pages)
            yield pb.GenerateEvent(
                reserved=pb.KvTarget(
                    endpoint=self.receiver.endpoint,
                    page_ids=pages,
                    transport=self.config.kv_transport,
                    decode_worker_id=self.config.worker_id,
                )
            )
            try:
                arrival = await asyncio.wait_for(
                    asyncio.wrap_future(arrival_future), self.config.kv_timeout_s
                )
            except TimeoutError:
                log.warning(
                    "request %s: KV did not arrive in %.0f s", request_id, self.config.kv_timeout_s
                )
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "KV did not arrive in time")
            except KvTransferError as exc:
                await context.abort(grpc.StatusCode.ABORTED, str(exc))
            if arrival.num_tokens != len(prompt):
                await context.abort(grpc.StatusCode.INTERNAL, "KV length differs from the prompt")
            first = arrival.first_token_id
            if first in params.stop_token_ids:
                yield pb.GenerateEvent(tokens=pb.TokenBatch(finish_reason="stop"))
                return
            if params.max_new_tokens <= 1:
                yield pb.GenerateEvent(tokens=pb.TokenBatch(finish_reason="length"))
                return
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[TokenEvent] = asyncio.Queue()

            def emit(event: TokenEvent) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)

            self.engine.submit(DecodeSequence(request_id, [*prompt, first], pages, params, 1, emit))
            submitted = True
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                message = pb.TokenBatch()
                for event in batch:
                    if event.error is not None:
                        await context.abort(grpc.StatusCode.INTERNAL, event.error)
                    if event.token_id is not None and event.finish_reason != "stop":
                        message.token_ids.append(event.token_id)
                        message.logprobs.append(event.logprob)
                    if event.finish_reason is not None:
                        message.finish_reason = event.finish_reason
                yield pb.GenerateEvent(tokens=message)
                if message.finish_reason:
                    return
        finally:
            # Runs on completion, on error and when the gateway cancels the call.
            self.receiver.cancel(request_id)
            if submitted:
                self.engine.abort(request_id)
            else:
                pool.free(pages)

    async def GetInfo(
        self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return worker_info(
            self.config, self.engine.runner, self.model_name, kv_endpoint=self.receiver.endpoint
        )

    def close(self) -> None:
        self.engine.stop()
        self.receiver.close()
