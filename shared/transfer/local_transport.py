"""The "transfer" of colocated mode: prefill computes straight into decode's pages.

Prefill and decode share one process and one KV pool, so nothing moves: the prefill
side looks up the pages decode reserved for the request (never pages named by the
caller) and completes the expectation when the prompt is computed.
"""

from __future__ import annotations

from shared.kv_pool import KVPool
from shared.transfer.base import KvArrival, KvReceiver


class LocalKvReceiver(KvReceiver):
    def __init__(self, pool: KVPool, worker_id: str) -> None:
        super().__init__(pool)
        self._endpoint = f"local://{worker_id}"

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def close(self) -> None:
        pass

    def take_reservation(self, request_id: str) -> list[int]:
        """The pages reserved for the request, with a reference held for the prefill.

        The reference keeps the pages from being reused should decode give up on the
        request while the prefill still writes into them; the caller frees it.
        """
        with self._lock:
            expectation = self._expected.get(request_id)
            if expectation is None:
                raise KeyError(f"no KV reservation for request {request_id} on this worker")
            self.pool.incref(expectation.page_ids)
            return list(expectation.page_ids)

    def complete(self, request_id: str, arrival: KvArrival) -> None:
        with self._lock:
            expectation = self._expected.pop(request_id, None)
        if expectation is not None and not expectation.future.done():
            expectation.future.set_result(arrival)
