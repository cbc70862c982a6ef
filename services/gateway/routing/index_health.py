"""Is the Redis prefix index usable? Says so once in the log and in /metrics.

The first failed lookup marks it down; from then on requests do not wait on Redis at all
(they are routed by load) while a background probe pings it, and the first good ping
brings prefix routing back. The probe also runs the janitor that clears the entries of
workers whose liveness expired.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.gateway.metrics import GatewayMetrics
from shared.prefix_index import PrefixIndexReader, PrefixIndexUnavailable

logger = logging.getLogger("kvrelay.gateway")


class IndexHealth:
    def __init__(
        self,
        reader: PrefixIndexReader,
        metrics: GatewayMetrics,
        *,
        fallback_policy: str = "least_load",
    ) -> None:
        self.reader = reader
        self.metrics = metrics
        self.fallback_policy = fallback_policy
        self.up = True  # optimistic: the first lookup tells
        self.down_since: float | None = None
        metrics.prefix_index_up.set(1)

    def mark_down(self, reason: str) -> None:
        if not self.up:
            return
        self.up = False
        self.down_since = time.monotonic()
        self.metrics.prefix_index_up.set(0)
        self.metrics.show_policy(self.fallback_policy)
        logger.warning(
            "prefix index at %s unavailable (%s): routing by %s until Redis is back",
            self.reader.redis_url,
            reason,
            self.fallback_policy,
        )

    def mark_up(self) -> None:
        if self.up:
            return
        down_s = time.monotonic() - (self.down_since or time.monotonic())
        self.up = True
        self.down_since = None
        self.metrics.prefix_index_up.set(1)
        self.metrics.show_policy("prefix")
        logger.info("prefix index is back after %.1f s: routing by prefix again", down_s)

    async def probe_loop(self, interval_s: float = 0.5, reap_every_s: float = 5.0) -> None:
        """Pings Redis while it is down; clears dead workers' entries while it is up."""
        next_reap = time.monotonic() + reap_every_s
        while True:
            try:
                if not self.up:
                    if await self.reader.ping():
                        self.mark_up()
                elif time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + reap_every_s
                    removed = await self.reader.reap_dead()
                    if removed:
                        logger.info("prefix index: removed %d entries of dead workers", removed)
            except PrefixIndexUnavailable as exc:
                self.mark_down(str(exc))
            except Exception:
                logger.exception("prefix index probe failed")
            await asyncio.sleep(interval_s)
