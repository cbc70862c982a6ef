"""The WorkerInfo both worker roles report over gRPC."""

from __future__ import annotations

from shared.config import WorkerConfig
from shared.model.runner import ModelRunner
from shared.rpc import kvrelay_pb2 as pb


def worker_info(
    config: WorkerConfig,
    runner: ModelRunner,
    model_name: str,
    kv_endpoint: str,
    cached_pages: int = 0,
) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=config.worker_id,
        role=config.role,
        model_name=model_name,
        page_size=runner.pool.page_size,
        dtype=config.dtype,
        num_pages=runner.pool.num_pages,
        free_pages=runner.pool.num_free,
        max_context=runner.config.max_context,
        kv_endpoint=kv_endpoint,
        cached_pages=cached_pages,
    )
