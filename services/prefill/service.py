"""gRPC face of a prefill worker."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from services.lora import worker_rpc as lora_rpc
from services.prefill import embed
from services.prefill.engine import KvDestination, PrefillEngine, PrefillJob
from services.worker_info import worker_info
from shared.config import WorkerConfig
from shared.kv_pool import KVPoolExhausted
from shared.model.runner import ModelRunner
from shared.observability.request_id import bind_grpc_call
from shared.observability.worker_metrics import worker_metrics
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_from_pb, top_logprobs_to_pb
from shared.transfer import KvTransferError

if TYPE_CHECKING:
    from shared.prefix_index import PrefixIndexPublisher

log = logging.getLogger(__name__)


class PrefillService(lora_rpc.LoraAdminServicer, pb_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: PrefillEngine,
        model_name: str,
        publisher: PrefixIndexPublisher | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.model_name = model_name
        self.publisher = publisher
        self._queued_tokens = 0
        self.pooling = embed.Pooling.for_model(engine.runner.model_dir)

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        bind_grpc_call(context, request.request_id)  # the request id on this call's log lines
        destination = None
        if request.HasField("kv_target"):
            if request.kv_target.transport not in ("", self.config.kv_transport):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"this worker sends KV over {self.config.kv_transport}, "
                    f"not {request.kv_target.transport}",
                )
            destination = KvDestination(
                request.kv_target.endpoint, [int(p) for p in request.kv_target.page_ids]
            )
        try:
            params = sampling_from_pb(request.sampling)
            if params.grammar is not None:
                # Compiled off the engine thread (the first one reads the vocabulary).
                await asyncio.to_thread(self.engine.grammars.compile, params.grammar)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling parameters: {exc}")
        if params.return_routed_experts and (why := self.engine.runner.routed_experts_refusal()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        job = PrefillJob(
            request_id=request.request_id,
            prompt=[int(t) for t in request.prompt_token_ids],
            params=params,
            destination=destination,
            cache_salt=request.cache_salt or None,
            lora=await lora_rpc.request_adapter(self.engine.runner, request.lora, context),
        )
        if self.engine.num_queued >= self.config.max_queued_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prefill worker {self.config.worker_id}: {self.engine.num_queued} requests queued",
            )
        self._report_load(len(job.prompt))
        try:
            future = self.engine.submit(job)
            outcome = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            log.info("request %s: cancelled by the caller", job.request_id)
            self.engine.cancel(job.request_id)
            raise
        except KVPoolExhausted as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill KV pool full: {exc}")
        except KvTransferError as exc:
            log.warning("request %s: KV transfer failed: %s", job.request_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self._report_load(-len(job.prompt))
        worker_metrics().prefill_done(
            len(job.prompt), outcome.cached_tokens, outcome.queue_s, outcome.compute_s
        )
        return pb.PrefillResponse(
            first_token_ids=outcome.first_token_ids,
            first_token_logprobs=outcome.first_token_logprobs,
            prompt_tokens=len(job.prompt),
            kv_bytes_sent=outcome.kv_bytes_sent,
            cached_tokens=outcome.cached_tokens,
            first_token_top_logprobs=[
                top_logprobs_to_pb(t) for t in outcome.first_token_top_logprobs
            ],
            routed_experts=outcome.routed_experts,
        )

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        bind_grpc_call(context, request.request_id)
        engine = self.engine
        return await embed.serve(
            request,
            context,
            engine.runner,
            engine.run_on_engine,
            self.pooling,
            engine.cache.allocate,
            engine.limits.max_prefill_tokens,
            engine.limits.chunked_prefill_size,
        )

    async def GetInfo(
        self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return worker_info(
            self.config,
            self.engine.runner,
            self.model_name,
            kv_endpoint="",
            cached_pages=self.engine.cache.num_idle_pages(),
        )

    def lora_runner(self) -> ModelRunner:
        return self.engine.runner

    def _report_load(self, queued_delta: int) -> None:
        self._queued_tokens += queued_delta
        if self.publisher is not None:
            pool = self.engine.runner.pool
            self.publisher.set_load(self._queued_tokens, pool.num_used, pool.num_pages)

    def close(self) -> None:
        self.engine.stop()
        self.engine.sender.close()
        if self.publisher is not None:
            self.publisher.close()
