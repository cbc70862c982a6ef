"""Admission on a decode worker: KV pages for new requests, first come first served.

A request whose prompt does not fit in the free pages waits behind the earlier ones, up
to a timeout; when too many already wait it is turned away at once, and the gateway
answers 503 with Retry-After. Nothing waits forever and the line is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from shared.kv_pool import KVPool, KVPoolExhausted


class AdmissionRejected(Exception):
    """The request cannot have pages now (full line, timeout) or ever (too large)."""

    def __init__(self, message: str, *, ever: bool = False) -> None:
        super().__init__(message)
        self.ever = ever


class PageAdmission:
    def __init__(
        self,
        pool: KVPool,
        max_waiting: int,
        headroom_pages: Callable[[], int] = lambda: 0,
        poll_s: float = 0.005,
    ) -> None:
        self.pool = pool
        self.max_waiting = max_waiting
        # Pages kept free for the running sequences' next tokens.
        self._headroom_pages = headroom_pages
        self._poll_s = poll_s
        self._line: deque[object] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._line)

    async def reserve(self, num_pages: int, timeout_s: float) -> list[int]:
        if num_pages > self.pool.num_pages:
            raise AdmissionRejected(
                f"the prompt needs {num_pages} KV pages; this decode worker has "
                f"{self.pool.num_pages}",
                ever=True,
            )
        if len(self._line) >= self.max_waiting:
            raise AdmissionRejected(f"{len(self._line)} requests already wait for KV pages")
        ticket = object()
        self._line.append(ticket)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._line[0] is ticket:
                    spare = self.pool.num_free - num_pages - self._headroom_pages()
                    # An idle pool admits anything that fits, headroom or not.
                    if spare >= 0 or self.pool.num_used == 0:
                        try:
                            return self.pool.allocate(num_pages)
                        except KVPoolExhausted:
                            pass
                if time.monotonic() >= deadline:
                    raise AdmissionRejected(f"no KV pages freed up within {timeout_s:.1f} s")
                await asyncio.sleep(self._poll_s)
        finally:
            self._line.remove(ticket)
