"""gRPC face of a decode worker: reserve pages, await the KV, stream the answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.decode.admission import AdmissionRejected, PageAdmission
from services.decode.engine import DecodeEngine, DecodeSequence, TokenEvent
from services.decode.parallel_sampling import fork_pages, pages_to_reserve
from services.lora import worker_rpc as lora_rpc
from services.worker_info import worker_info
from shared.config import WorkerConfig
from shared.model.runner import ModelRunner
from shared.observability.request_id import bind_grpc_call
from shared.observability.worker_metrics import worker_metrics
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_from_pb, top_logprobs_to_pb
from shared.transfer import KvReceiver, KvTransferError

log = logging.getLogger(__name__)


class DecodeService(lora_rpc.LoraAdminServicer, pb_grpc.DecodeWorkerServicer):
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
        bind_grpc_call(context, request_id)  # the request id on this call's log lines
        prompt = [int(t) for t in request.prompt_token_ids]
        try:
            params = sampling_from_pb(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling parameters: {exc}")
        runner = self.engine.runner
        if params.return_routed_experts and (why := runner.routed_experts_refusal()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        lora = await lora_rpc.request_adapter(runner, request.lora, context)
        pool = runner.pool
        if not prompt or len(prompt) >= runner.config.max_context:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(prompt)} tokens does not fit the context of "
                f"{runner.config.max_context}",
            )
        try:
            reserved = await self.admission.reserve(
                pages_to_reserve(pool, len(prompt), params.n), self.config.queue_timeout_s
            )
        except AdmissionRejected as exc:
            code = (
                grpc.StatusCode.INVALID_ARGUMENT if exc.ever else grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            await context.abort(code, f"decode worker {self.config.worker_id}: {exc}")
        worker_metrics().decode_admitted()
        # Pages this call still owns; whatever goes to the engine is the engine's to free.
        owned: list[list[int]] = [reserved]
        submitted = False
        compiling: asyncio.Future[Any] | None = None
        if params.grammar is not None:
            # Compiled (or found in the cache) while prefill runs.
            compiling = asyncio.ensure_future(
                asyncio.to_thread(self.engine.grammars.compile, params.grammar)
            )
        pages = reserved[: pool.pages_for(len(prompt))]  # the prompt's; the rest are spares
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
            log.info("request %s: KV of %d tokens in %d pages", request_id, len(prompt), len(pages))
            if len(arrival.first_token_ids) != params.n:
                await context.abort(grpc.StatusCode.INTERNAL, "prefill sampled the wrong n")
            if compiling is not None:
                try:
                    await compiling
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            owned = fork_pages(pool, len(prompt), reserved, params.n)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
            unfinished: set[int] = set()
            for index, first in enumerate(arrival.first_token_ids):
                choice_pages, owned[index] = owned[index], []
                reason = None
                grammar = None
                if params.grammar is not None:
                    # The same grammar as prefill's mask, past the first token.
                    grammar = self.engine.grammars.matcher(params.grammar, params.stop_token_ids)
                    if not grammar.accept(first):
                        pool.free(choice_pages)
                        await context.abort(
                            grpc.StatusCode.INTERNAL, "the first token breaks the grammar"
                        )
                if first in params.stop_token_ids or (grammar is not None and grammar.terminated):
                    reason = "stop"
                elif params.max_new_tokens <= 1:
                    reason = "length"
                if reason is not None:  # the first token already ended this choice
                    pool.free(choice_pages)
                    yield pb.GenerateEvent(tokens=pb.TokenBatch(finish_reason=reason, index=index))
                    continue

                def emit(event: TokenEvent, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                self.engine.submit(
                    DecodeSequence(
                        request_id,
                        [*prompt, first],
                        choice_pages,
                        params.for_choice(index),
                        1,
                        emit,
                        index=index,
                        lora=lora,
                        grammar=grammar,
                    )
                )
                submitted = True
                unfinished.add(index)
            while unfinished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                messages: dict[int, pb.TokenBatch] = {}
                for index, event in batch:
                    if event.error is not None:
                        await context.abort(grpc.StatusCode.INTERNAL, event.error)
                    message = messages.setdefault(index, pb.TokenBatch(index=index))
                    message.routed_experts += event.routed_experts  # a "stop" step's too
                    if event.token_id is not None and event.finish_reason != "stop":
                        message.token_ids.append(event.token_id)
                        message.logprobs.append(event.logprob)
                        if event.top_logprobs is not None:
                            message.top_logprobs.append(top_logprobs_to_pb(event.top_logprobs))
                    if event.finish_reason is not None:
                        message.finish_reason = event.finish_reason
                        unfinished.discard(index)
                for message in messages.values():
                    worker_metrics().decode_generated_tokens.inc(len(message.token_ids))
                    yield pb.GenerateEvent(tokens=message)
        finally:
            # Runs on completion, on error and when the gateway cancels the call.
            if compiling is not None and not compiling.cancel() and not compiling.cancelled():
                compiling.exception()  # seen: no "exception never retrieved" warning
            self.receiver.cancel(request_id)
            if submitted:
                self.engine.abort(request_id)
            for choice_pages in owned:
                pool.free(choice_pages)

    def lora_runner(self) -> ModelRunner:
        return self.engine.runner

    async def GetInfo(
        self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return worker_info(
            self.config, self.engine.runner, self.model_name, kv_endpoint=self.receiver.endpoint
        )

    def close(self) -> None:
        self.engine.stop()
        self.receiver.close()
