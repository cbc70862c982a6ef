"""The KV transfer contract, written once; a backend (ZeroMQ, NIXL) only moves bytes.

Decode side: `KvReceiver.expect(request_id, pages)` before prefill starts; the
returned future resolves when the KvDone arrives after every chunk.
`cancel(request_id)` guarantees that no later chunk for that request lands in
its pages, so the caller may free them as soon as it returns (a chunk whose bytes are
already on their way keeps its own reference on its pages until they have landed).

Prefill side: `KvSender.send_pages(...)` writes pages into the decode worker's
reserved pages (in as many calls as suits the compute), `send_done(...)` closes the
request with its first token, `abort(...)` gives up on it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from shared.kv_pool import KVPool
from shared.observability.worker_metrics import worker_metrics
from shared.transfer.messages import KvAbort, KvChunk, KvDone

log = logging.getLogger(__name__)

DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class KvTransferError(Exception):
    """The KV of a request cannot arrive (aborted by prefill, malformed, or unreachable)."""


@dataclass(frozen=True)
class KvArrival:
    num_tokens: int
    first_token_ids: list[int]  # one per choice
    first_token_logprobs: list[float]


@dataclass
class _Expectation:
    page_ids: list[int]
    future: Future[KvArrival]
    chunks_received: int = 0
    bytes_received: int = 0
    first_chunk_at: float | None = None  # time.perf_counter(), for the transfer's duration
    in_flight: int = 0  # claimed chunks whose bytes are still on their way
    pending_done: KvDone | None = None  # a KvDone that came before its last chunk landed
    page_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.page_set = frozenset(self.page_ids)


@dataclass(frozen=True)
class ChunkClaim:
    """A chunk checked against its reservation, its bytes on their way into its pages."""

    chunk: KvChunk
    num_bytes: int
    expectation: _Expectation


def _succeed(future: Future[KvArrival], arrival: KvArrival) -> None:
    # The waiter may have cancelled it meanwhile (cancel() races the receive thread).
    with contextlib.suppress(InvalidStateError):
        future.set_result(arrival)


def _fail(future: Future[KvArrival], error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)


class KvReceiver(ABC):
    """Decode side: receives KV into pages reserved for expected requests only."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._expected: dict[str, _Expectation] = {}
        # Held while a chunk is copied into pages, so cancel() never races a write.
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Address prefill workers send to."""

    @abstractmethod
    def close(self) -> None: ...

    def expect(self, request_id: str, page_ids: list[int]) -> Future[KvArrival]:
        future: Future[KvArrival] = Future()
        with self._lock:
            if request_id in self._expected:
                raise ValueError(f"request {request_id} is already expecting KV")
            self._expected[request_id] = _Expectation(list(page_ids), future)
        return future

    def cancel(self, request_id: str) -> None:
        with self._lock:
            expectation = self._expected.pop(request_id, None)
        if expectation is not None and not expectation.future.done():
            expectation.future.cancel()

    @property
    def num_expected(self) -> int:
        return len(self._expected)

    # The protocol, called by backends from their receive thread.

    def on_chunk(self, chunk: KvChunk, data: memoryview) -> None:
        with self._lock:
            expectation = self._expected.get(chunk.request_id)
            if expectation is None:
                log.debug("dropping KV chunk of request %s: not expected", chunk.request_id)
                return
            expectation.first_chunk_at = expectation.first_chunk_at or time.perf_counter()
            try:
                self._write_chunk(expectation, chunk, data)
            except (ValueError, RuntimeError) as exc:
                del self._expected[chunk.request_id]
                worker_metrics().transfer.failed("receive", "bad_chunk")
                _fail(expectation.future, KvTransferError(f"bad KV chunk: {exc}"))
                return
            expectation.chunks_received += 1
            expectation.bytes_received += len(data)

    def on_done(self, done: KvDone) -> None:
        with self._lock:
            expectation = self._expected.get(done.request_id)
            if expectation is None:
                return
            if expectation.in_flight:
                # Chunks still landing (NIXL reads): the last to land closes the request.
                expectation.pending_done = done
                return
            del self._expected[done.request_id]
        self._close(expectation, done)

    def _close(self, expectation: _Expectation, done: KvDone) -> None:
        metrics = worker_metrics().transfer
        if expectation.chunks_received != done.num_chunks:
            metrics.failed("receive", "incomplete")
            _fail(
                expectation.future,
                KvTransferError(
                    f"KV of request {done.request_id} incomplete: "
                    f"{expectation.chunks_received} of {done.num_chunks} chunks"
                ),
            )
        elif self.pool.pages_for(done.num_tokens) != len(expectation.page_ids):
            metrics.failed("receive", "incomplete")
            _fail(
                expectation.future,
                KvTransferError(f"KV of {done.num_tokens} tokens does not fit the reserved pages"),
            )
        elif expectation.bytes_received != len(expectation.page_ids) * self.pool.page_bytes():
            metrics.failed("receive", "incomplete")
            _fail(
                expectation.future,
                KvTransferError(f"KV of request {done.request_id} does not cover every page"),
            )
        else:
            started = expectation.first_chunk_at or time.perf_counter()  # no chunk: no pages
            metrics.received(
                expectation.bytes_received, len(expectation.page_ids), time.perf_counter() - started
            )
            _succeed(
                expectation.future,
                KvArrival(
                    done.num_tokens, list(done.first_token_ids), list(done.first_token_logprobs)
                ),
            )

    def on_abort(self, abort: KvAbort) -> None:
        with self._lock:
            expectation = self._expected.pop(abort.request_id, None)
        if expectation is not None:
            worker_metrics().transfer.failed("receive", "aborted")
            _fail(
                expectation.future, KvTransferError(f"prefill aborted the transfer: {abort.reason}")
            )

    # For backends whose bytes land in the pages by themselves (NIXL reads): the chunk is
    # checked before any byte moves, and its pages keep an extra reference until the bytes
    # have landed, so a cancel() meanwhile lets the caller free them without a late write
    # landing in pages that someone else already owns.

    def claim_chunk(self, chunk: KvChunk) -> ChunkClaim | None:
        """A claim to fill the chunk's pages, or None: drop the chunk, move nothing."""
        with self._lock:
            expectation = self._expected.get(chunk.request_id)
            if expectation is None:
                log.debug("dropping KV chunk of request %s: not expected", chunk.request_id)
                return None
            try:
                shape = self._check_chunk(expectation, chunk)
            except ValueError as exc:
                del self._expected[chunk.request_id]
                worker_metrics().transfer.failed("receive", "bad_chunk")
                _fail(expectation.future, KvTransferError(f"bad KV chunk: {exc}"))
                return None
            expectation.first_chunk_at = expectation.first_chunk_at or time.perf_counter()
            self.pool.incref(chunk.dst_page_ids)
            expectation.in_flight += 1
            num_bytes = torch.Size(shape).numel() * self.pool.kv.element_size()
            return ChunkClaim(chunk, num_bytes, expectation)

    def chunk_landed(self, claim: ChunkClaim, error: str | None = None) -> None:
        """The claimed bytes are in their pages, or with `error` will never arrive."""
        expectation, request_id = claim.expectation, claim.chunk.request_id
        done = None
        with self._lock:
            expectation.in_flight -= 1
            current = self._expected.get(request_id) is expectation
            if current and error is not None:
                del self._expected[request_id]
                worker_metrics().transfer.failed("receive", "transport")
                _fail(expectation.future, KvTransferError(f"KV chunk lost: {error}"))
            elif current:
                expectation.chunks_received += 1
                expectation.bytes_received += claim.num_bytes
                if not expectation.in_flight and expectation.pending_done is not None:
                    done = expectation.pending_done
                    del self._expected[request_id]
        self.pool.free(claim.chunk.dst_page_ids)  # the claim's reference: nothing lands now
        if done is not None:
            self._close(expectation, done)

    def _check_chunk(self, expectation: _Expectation, chunk: KvChunk) -> tuple[int, ...]:
        """The shape of the chunk's tensor, once the chunk fits the reservation and pool."""
        pool = self.pool
        # A sender may only write the pages reserved for this very request.
        if not expectation.page_set.issuperset(chunk.dst_page_ids):
            raise ValueError("destination pages outside the reservation")
        num_layers = pool.kv.shape[0]
        if not 0 <= chunk.layer_start < chunk.layer_end <= num_layers:
            raise ValueError(f"layers [{chunk.layer_start}, {chunk.layer_end}) out of range")
        if (chunk.page_size, chunk.num_kv_heads, chunk.head_dim) != tuple(pool.kv.shape[3:]):
            raise ValueError("page geometry differs between prefill and decode")
        if DTYPES_BY_NAME.get(chunk.dtype) != pool.kv.dtype:
            raise ValueError(f"dtype {chunk.dtype} differs from the pool's {pool.kv.dtype}")
        num_layers_sent = chunk.layer_end - chunk.layer_start
        return (num_layers_sent, 2, len(chunk.dst_page_ids), *pool.kv.shape[3:])

    def _write_chunk(self, expectation: _Expectation, chunk: KvChunk, data: memoryview) -> None:
        pool = self.pool
        shape = self._check_chunk(expectation, chunk)
        tensor = torch.frombuffer(data, dtype=pool.kv.dtype)
        if tensor.numel() != torch.Size(shape).numel():
            raise ValueError("chunk size does not match its header")
        index = torch.tensor(chunk.dst_page_ids, dtype=torch.long)
        pool.kv[chunk.layer_start : chunk.layer_end, :, index] = tensor.view(shape)


class KvSender(ABC):
    """Prefill side. Not thread-safe: one engine thread sends."""

    # Chunks of about this size pipeline well over both ZeroMQ and NIXL.
    target_chunk_bytes = 1 << 20

    def send_pages(
        self,
        *,
        request_id: str,
        endpoint: str,
        pool: KVPool,
        src_page_ids: list[int],
        dst_page_ids: list[int],
    ) -> tuple[int, int]:
        """Sends some of a request's pages (all layers); returns (bytes, chunks) sent.

        A request's pages may go in several calls (cached prefix first, then each computed
        chunk), so decode copies early pages while prefill still computes later ones.
        """
        if len(src_page_ids) != len(dst_page_ids):
            raise KvTransferError(
                f"{len(src_page_ids)} source pages for {len(dst_page_ids)} destination pages"
            )
        if not src_page_ids:
            return 0, 0
        started = time.perf_counter()
        num_layers = pool.kv.shape[0]
        layer_bytes = pool.page_bytes() // num_layers * len(src_page_ids)
        layers_per_chunk = max(1, min(num_layers, self.target_chunk_bytes // max(layer_bytes, 1)))
        src_index = torch.tensor(src_page_ids, dtype=torch.long)
        sent = 0
        num_chunks = 0
        for layer_start in range(0, num_layers, layers_per_chunk):
            layer_end = min(num_layers, layer_start + layers_per_chunk)
            header = KvChunk(
                request_id=request_id,
                layer_start=layer_start,
                layer_end=layer_end,
                dst_page_ids=list(dst_page_ids),
                page_size=pool.page_size,
                num_kv_heads=pool.kv.shape[4],
                head_dim=pool.kv.shape[5],
                dtype=DTYPE_NAMES[pool.kv.dtype],
            )
            sent += self._send_chunk_pages(endpoint, header, pool, src_index)
            num_chunks += 1
        worker_metrics().transfer.sent(sent, len(src_page_ids), time.perf_counter() - started)
        return sent, num_chunks

    def send_done(
        self,
        *,
        request_id: str,
        endpoint: str,
        num_tokens: int,
        num_chunks: int,
        first_token_ids: list[int],
        first_token_logprobs: list[float],
    ) -> None:
        """Closes a request's transfer: every chunk was sent; here is its first token."""
        done = KvDone(request_id, num_tokens, num_chunks, first_token_ids, first_token_logprobs)
        self._send_control(endpoint, done)

    def abort(self, *, request_id: str, endpoint: str, reason: str) -> None:
        self._send_control(endpoint, KvAbort(request_id, reason))

    def _send_chunk_pages(
        self, endpoint: str, header: KvChunk, pool: KVPool, src_index: torch.Tensor
    ) -> int:
        """Sends the header's layers of the source pages; returns the bytes sent.

        Advanced indexing copies the pages into one contiguous block: the source pages may
        be freed and reused while the transport still holds the bytes. A backend whose peer
        reads the pages in place (NIXL) holds the pages instead of copying them.
        """
        block = pool.kv[header.layer_start : header.layer_end, :, src_index]
        return self._send_chunk(endpoint, header, block)

    @abstractmethod
    def _send_chunk(self, endpoint: str, header: KvChunk, block: torch.Tensor) -> int: ...

    @abstractmethod
    def _send_control(self, endpoint: str, message: KvDone | KvAbort) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
