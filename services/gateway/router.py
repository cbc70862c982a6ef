"""Which prefill and decode worker serve a request.

The prefill worker is chosen by the configured policy (routing/policies.py): by default
`prefix` with a Redis index, `approx` without. While Redis is unavailable, `prefix`
routes by `least_load` (routing/index_health.py). The decode worker is the one with the
fewest requests in flight among those with room for the prompt, then the most free pages.

A Route is also a lease on the local load figures: the caller says when prefill is done
and when the request is over, so that the next routing decision sees this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from services.gateway.errors import UNAVAILABLE, APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.routing.index_health import IndexHealth
from services.gateway.routing.policies import (
    LeastLoadPolicy,
    NoIndexedWorker,
    PrefillChoice,
    PrefillPolicy,
    PrefixPolicy,
    RouteQuery,
)
from services.gateway.routing.workers import WorkerDirectory, WorkerView
from services.gateway.worker_clients import WorkerClient
from shared.block_hash import block_hashes
from shared.prefix_index import PrefixIndexUnavailable

logger = logging.getLogger("kvrelay.gateway")


class Route:
    def __init__(
        self,
        prefill: WorkerClient,
        decode: WorkerClient | None,  # None: prefill alone answers (max_tokens == 1)
        *,
        policy: str = "round_robin",
        predicted_cached_tokens: int = 0,
        on_prefill_done: Callable[[int | None], None] | None = None,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.policy = policy
        self.predicted_cached_tokens = predicted_cached_tokens
        self._on_prefill_done = on_prefill_done
        self._on_release = on_release
        self._prefill_done = False
        self._released = False

    def __repr__(self) -> str:
        decode = self.decode.addr if self.decode else "-"
        return f"Route({self.policy}: {self.prefill.addr} -> {decode})"

    def prefill_done(self, cached_tokens: int | None = None) -> None:
        """Prefill answered; `cached_tokens`: what its prefix cache covered, if it said."""
        if self._prefill_done:
            return
        self._prefill_done = True
        if self._on_prefill_done is not None:
            self._on_prefill_done(cached_tokens)

    def release(self) -> None:
        """The request is over (done, failed or cancelled). Safe to call more than once."""
        if self._released:
            return
        if not self._prefill_done:
            self._prefill_done = True
            if self._on_prefill_done is not None:
                self._on_prefill_done(None)
        self._released = True
        if self._on_release is not None:
            self._on_release()


class Router(Protocol):
    async def route(
        self,
        prompt_token_ids: Sequence[int],
        *,
        needs_decode: bool,
        cache_salt: str | None = None,
        exclude: Collection[WorkerClient] = (),
        lora: str | None = None,  # the LoRA adapter's key: it enters the block hashes
    ) -> Route: ...


def _candidates(views: list[WorkerView], exclude: Collection[WorkerClient], role: str
                ) -> list[WorkerView]:
    if not views:
        raise APIError(503, f"no {role} worker is configured", type=UNAVAILABLE)
    now = time.monotonic()
    allowed = [v for v in views if v.client not in exclude] or views
    usable = [v for v in allowed if v.client.usable(now)]
    # With none known healthy, still try one: the call then fails with the real reason.
    return usable or allowed


class PolicyRouter:
    def __init__(
        self,
        directory: WorkerDirectory,
        policy: PrefillPolicy,
        metrics: GatewayMetrics,
        *,
        model_name: str,
        index_health: IndexHealth | None = None,
    ) -> None:
        self.directory = directory
        self.policy = policy
        self.metrics = metrics
        self.model_name = model_name
        self.index_health = index_health
        self._fallback = LeastLoadPolicy()
        self._decode_turn = 0
        self._unindexed_logged = False
        metrics.show_policy(policy.name)

    def hashes(
        self, prompt_token_ids: Sequence[int], cache_salt: str | None, lora: str | None = None
    ) -> RouteQuery:
        block_size = self.directory.block_size()
        hashes = block_hashes(
            prompt_token_ids,
            block_size,
            model=self.directory.model_name(self.model_name),
            lora=lora,
            cache_salt=cache_salt,
        )
        return RouteQuery(len(prompt_token_ids), hashes, block_size)

    async def route(
        self,
        prompt_token_ids: Sequence[int],
        *,
        needs_decode: bool,
        cache_salt: str | None = None,
        exclude: Collection[WorkerClient] = (),
        lora: str | None = None,
    ) -> Route:
        prefill_views = _candidates(self.directory.prefill, exclude, "prefill")
        decode_views = _candidates(self.directory.decode, exclude, "decode") if needs_decode else []
        query = self.hashes(prompt_token_ids, cache_salt, lora)
        choice = await self._choose_prefill(prefill_views, query)
        decode = self._choose_decode(decode_views, query) if needs_decode else None
        return self._lease(choice, decode, query)

    async def _choose_prefill(self, views: list[WorkerView], query: RouteQuery
                              ) -> PrefillChoice:
        policy = self.policy
        health = self.index_health
        if isinstance(policy, PrefixPolicy) and health is not None and not health.up:
            return await self._fallback.choose(views, query)
        try:
            choice = await policy.choose(views, query)
            self._unindexed_logged = False
            return choice
        except PrefixIndexUnavailable as exc:
            if health is not None:
                health.mark_down(str(exc))
        except NoIndexedWorker as exc:
            if not self._unindexed_logged:
                self._unindexed_logged = True
                logger.warning("prefix routing: %s; routing by least_load meanwhile", exc)
        return await self._fallback.choose(views, query)

    def _choose_decode(self, views: list[WorkerView], query: RouteQuery) -> WorkerView:
        pages_needed = -(-query.prompt_len // query.block_size)
        roomy = [v for v in views if v.free_pages is None or v.free_pages >= pages_needed]
        pool = roomy or views
        self._decode_turn += 1
        count = len(pool)
        best = min(
            range(count),
            key=lambda i: (
                pool[i].inflight,
                -(pool[i].free_pages or 0),
                (i - self._decode_turn) % count,
            ),
        )
        return pool[best]

    def _lease(self, choice: PrefillChoice, decode: WorkerView | None, query: RouteQuery
               ) -> Route:
        prefill = choice.view
        cached_tokens = min(choice.cached_blocks * query.block_size, query.prompt_len)
        uncached = query.prompt_len - cached_tokens
        prefill.inflight += 1
        prefill.add_queued(query.prompt_len, uncached)
        if decode is not None:
            decode.inflight += 1
        # A fallback decision still teaches the routing history what went where.
        own_choice = PrefillChoice(prefill, choice.cached_blocks, self.policy.name)
        self.policy.routed(own_choice, query)
        self.metrics.routed_requests.labels(policy=choice.policy).inc()
        self.metrics.predicted_cached_tokens.inc(cached_tokens)

        def on_prefill_done(actual_cached: int | None) -> None:
            self.policy.prefill_done(own_choice, query)
            prefill.inflight -= 1
            prefill.add_queued(-query.prompt_len, -uncached)
            if actual_cached is not None:
                self.metrics.prefill_prompt_tokens.inc(query.prompt_len)
                self.metrics.prefill_cached_tokens.inc(actual_cached)

        def on_release() -> None:
            if decode is not None:
                decode.inflight -= 1

        return Route(
            prefill.client,
            decode.client if decode is not None else None,
            policy=choice.policy,
            predicted_cached_tokens=cached_tokens,
            on_prefill_done=on_prefill_done,
            on_release=on_release,
        )
