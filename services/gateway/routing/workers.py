"""The router's view of each worker: identity and KV figures (GetInfo), and local load.

Local load is what this gateway itself has sent and not seen finish: exact and instant,
where figures reported through Redis lag by a heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import grpc.aio

from services.gateway.worker_clients import WorkerClient, WorkerPool
from shared.rpc import kvrelay_pb2 as pb

logger = logging.getLogger("kvrelay.gateway")

INFO_TIMEOUT_S = 1.0
DEFAULT_BLOCK_SIZE = 16  # DESIGN.md's default, until a prefill worker says otherwise
QUEUE_LOG_S = 30.0  # longer than a worker's report can be old (it beats every TTL / 3)


@dataclass(eq=False)
class WorkerView:
    client: WorkerClient
    # From GetInfo (None until the worker first answered):
    worker_id: str | None = None
    model_name: str | None = None
    page_size: int | None = None
    num_pages: int | None = None
    free_pages: int | None = None
    # Local load:
    inflight: int = 0  # requests routed here and not finished
    queued_tokens: int = 0  # prefill: prompt tokens routed here, prefill not done yet
    queued_uncached_tokens: int = 0  # prefill: of those, the ones predicted not cached
    # (wall time, change of queued_tokens): what the queue was when a worker reported it
    _queue_log: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def addr(self) -> str:
        return self.client.addr

    def __repr__(self) -> str:
        return f"{self.client!r} ({self.worker_id or 'id unknown'})"

    def add_queued(self, tokens: int, uncached_tokens: int) -> None:
        now = time.time()
        self.queued_tokens += tokens
        self.queued_uncached_tokens += uncached_tokens
        self._queue_log.append((now, tokens))
        while self._queue_log and self._queue_log[0][0] < now - QUEUE_LOG_S:
            self._queue_log.popleft()

    def queued_tokens_at(self, wall_time: float) -> int:
        """This gateway's queued_tokens on the worker as it was at `wall_time`."""
        later = sum(delta for at, delta in self._queue_log if at > wall_time)
        return self.queued_tokens - later

    def others_queued_tokens(self, reported: int, reported_at: float) -> int:
        """Of a queue the worker reported at `reported_at`, what other gateways sent.

        The report may predate this gateway's latest changes (it lags a heartbeat):
        subtracting this gateway's own queue *as it was then* neither counts a finished
        request twice nor misses one just sent.
        """
        return max(reported - self.queued_tokens_at(reported_at), 0)

    def update(self, info: pb.WorkerInfo) -> None:
        if info.worker_id and info.worker_id != self.worker_id:
            logger.info("%r is worker %s", self.client, info.worker_id)
        self.worker_id = info.worker_id or self.worker_id
        self.model_name = info.model_name or self.model_name
        self.page_size = info.page_size or self.page_size
        self.num_pages = info.num_pages
        self.free_pages = info.free_pages


class WorkerDirectory:
    """Every configured worker's view, refreshed by GetInfo."""

    def __init__(self, pool: WorkerPool) -> None:
        self.prefill = [WorkerView(c) for c in pool.prefill]
        self.decode = [WorkerView(c) for c in pool.decode]
        self._by_client = {id(v.client): v for v in self.prefill + self.decode}
        self._size_warned = False

    def view(self, client: WorkerClient) -> WorkerView:
        return self._by_client[id(client)]

    def prefill_by_id(self) -> dict[str, WorkerView]:
        return {v.worker_id: v for v in self.prefill if v.worker_id}

    def prefill_by_addr(self) -> dict[str, WorkerView]:
        return {v.addr: v for v in self.prefill}

    def block_size(self) -> int:
        """The prefill workers' page size: the block size of the hashes they announce."""
        sizes = {v.page_size for v in self.prefill if v.page_size}
        if len(sizes) > 1 and not self._size_warned:
            self._size_warned = True
            logger.warning("prefill workers disagree on the page size: %s", sorted(sizes))
        return min(sizes) if sizes else DEFAULT_BLOCK_SIZE

    def model_name(self, default: str) -> str:
        """The model name prefill workers hash with (they must agree with the gateway's)."""
        for view in self.prefill:
            if view.model_name:
                return view.model_name
        return default

    async def _refresh_one(self, view: WorkerView) -> None:
        client = view.client
        stub = client.prefill_stub() if client.role == "prefill" else client.decode_stub()
        try:
            info = await stub.GetInfo(
                pb.WorkerInfoRequest(), timeout=INFO_TIMEOUT_S, metadata=client.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("%r: GetInfo failed: %s", client, exc.code().name)
            return
        view.update(info)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(v) for v in self.prefill + self.decode))

    async def refresh_loop(self, interval_s: float = 1.0) -> None:
        """Keeps identities and free pages fresh (runs for the app's lifetime)."""
        while True:
            try:
                await self.refresh()
            except Exception:
                logger.exception("worker info round failed")
            await asyncio.sleep(interval_s)
