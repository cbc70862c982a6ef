"""gRPC face of a prefill worker."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from services.prefill.engine import KvDestination, PrefillEngine, PrefillJob
from services.worker_info import worker_info
from shared.config import WorkerConfig
from shared.kv_pool import KVPoolExhausted
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_from_pb
from shared.transfer import KvTransferError

log = logging.getLogger(__name__)


class PrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, config: WorkerConfig, engine: PrefillEngine, model_name: str) -> None:
        self.config = config
        self.engine = engine
        self.model_name = model_name
        # One engine thread: the model and the KV sender are used from it alone.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-engine")

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
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
        job = PrefillJob(
            request_id=request.request_id,
            prompt=[int(t) for t in request.prompt_token_ids],
            params=sampling_from_pb(request.sampling),
            destination=destination,
        )
        loop = asyncio.get_running_loop()
        try:
            # A call cancelled while queued never reaches the engine thread.
            outcome = await loop.run_in_executor(self._executor, self.engine.run, job)
        except KVPoolExhausted as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill KV pool full: {exc}")
        except KvTransferError as exc:
            log.warning("request %s: KV transfer failed: %s", job.request_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.PrefillResponse(
            first_token_id=outcome.first_token_id,
            first_token_logprob=outcome.first_token_logprob,
            prompt_tokens=len(job.prompt),
            kv_bytes_sent=outcome.kv_bytes_sent,
        )

    async def GetInfo(
        self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return worker_info(self.config, self.engine.runner, self.model_name, kv_endpoint="")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.sender.close()

