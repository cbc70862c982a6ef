"""The KV transfer contract, written once; a backend (ZeroMQ, NIXL) only moves bytes.

Decode side: `KvReceiver.expect(request_id, pages)` before prefill starts; the
returned future resolves when the KvDone arrives after every chunk.
`cancel(request_id)` guarantees that no later chunk for that request lands in
its pages, so the caller may free them as soon as it returns.

Prefill side: `KvSender.send_pages(...)` writes pages into the decode worker's
reserved pages (in as many calls as suits the compute), `send_done(...)` closes the
request with its first token, `abort(...)` gives up on it.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from shared.kv_pool import KVPool
from shared.transfer.messages import KvAbort, KvChunk, KvDone

log = logging.getLogger(__name__)

DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class KvTransferError(Exception):
    """The KV of a request cannot arrive (aborted by prefill, malformed, or unreachable)."""


@dataclass(frozen=True)
class KvArrival:
    num_tokens: int
    first_token_id: int
    first_token_logprob: float


@dataclass
class _Expectation:
    page_ids: list[int]
    future: Future[KvArrival]
    chunks_received: int = 0
    bytes_received: int = 0
    page_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.page_set = frozenset(self.page_ids)


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
            try:
                self._write_chunk(expectation, chunk, data)
            except (ValueError, RuntimeError) as exc:
                del self._expected[chunk.request_id]
                expectation.future.set_exception(KvTransferError(f"bad KV chunk: {exc}"))
                return
            expectation.chunks_received += 1
            expectation.bytes_received += len(data)

    def on_done(self, done: KvDone) -> None:
        with self._lock:
            expectation = self._expected.pop(done.request_id, None)
        if expectation is None:
            return
        if expectation.chunks_received != done.num_chunks:
            expectation.future.set_exception(
                KvTransferError(
                    f"KV of request {done.request_id} incomplete: "
                    f"{expectation.chunks_received} of {done.num_chunks} chunks"
                )
            )
        elif self.pool.pages_for(done.num_tokens) != len(expectation.page_ids):
            expectation.future.set_exception(
                KvTransferError(f"KV of {done.num_tokens} tokens does not fit the reserved pages")
            )
        elif expectation.bytes_received != len(expectation.page_ids) * self.pool.page_bytes():
            expectation.future.set_exception(
                KvTransferError(f"KV of request {done.request_id} does not cover every page")
            )
        else:
            expectation.future.set_result(
                KvArrival(done.num_tokens, done.first_token_id, done.first_token_logprob)
            )

    def on_abort(self, abort: KvAbort) -> None:
        with self._lock:
            expectation = self._expected.pop(abort.request_id, None)
        if expectation is not None:
            expectation.future.set_exception(
                KvTransferError(f"prefill aborted the transfer: {abort.reason}")
            )

    def _write_chunk(self, expectation: _Expectation, chunk: KvChunk, data: memoryview) -> None:
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
        shape = (num_layers_sent, 2, len(chunk.dst_page_ids), *pool.kv.shape[3:])
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
        num_layers = pool.kv.shape[0]
        layer_bytes = pool.page_bytes() // num_layers * len(src_page_ids)
        layers_per_chunk = max(1, min(num_layers, self.target_chunk_bytes // max(layer_bytes, 1)))
        src_index = torch.tensor(src_page_ids, dtype=torch.long)
        sent = 0
        num_chunks = 0
        for layer_start in range(0, num_layers, layers_per_chunk):
            layer_end = min(num_layers, layer_start + layers_per_chunk)
            # Advanced indexing copies the pages into one contiguous block: the source
            # pages may be freed and reused while the transport still holds the bytes.
            block = pool.kv[layer_start:layer_end, :, src_index]
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
            sent += self._send_chunk(endpoint, header, block)
            num_chunks += 1
        return sent, num_chunks

    def send_done(
        self,
        *,
        request_id: str,
        endpoint: str,
        num_tokens: int,
        num_chunks: int,
        first_token_id: int,
        first_token_logprob: float,
    ) -> None:
        """Closes a request's transfer: every chunk was sent; here is its first token."""
        done = KvDone(request_id, num_tokens, num_chunks, first_token_id, first_token_logprob)
        self._send_control(endpoint, done)

    def abort(self, *, request_id: str, endpoint: str, reason: str) -> None:
        self._send_control(endpoint, KvAbort(request_id, reason))

    @abstractmethod
    def _send_chunk(self, endpoint: str, header: KvChunk, block: torch.Tensor) -> int: ...

    @abstractmethod
    def _send_control(self, endpoint: str, message: KvDone | KvAbort) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
