"""Prefill routing policies: which prefill worker computes a prompt.

    prefix       the Redis index says how much of the prompt each live worker holds;
                 pick the least cost = w_uncached * tokens to compute + w_load * queued
    approx       the same cost, with an approximate tree of this gateway's own routes
    least_load   the fewest queued prefill tokens
    round_robin  in turn

Ties (e.g. an idle cluster, an unseen prompt) go to the worker with fewer requests in
flight, then in turn, so that new prefixes spread over the workers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.gateway.routing.approx_tree import DEFAULT_CAPACITY_BLOCKS, ApproxPrefixTree
from services.gateway.routing.workers import WorkerView
from shared.prefix_index import PrefixIndexReader, WorkerMatch

POLICIES = ("prefix", "approx", "round_robin", "least_load")


@dataclass(frozen=True)
class CostWeights:
    """Both in units of prompt tokens computed. A queue weighs less than its size: its
    first job is on average half done, and sending a prompt to the worker that holds its
    prefix saves compute that every later request would otherwise wait for."""

    uncached: float = 1.0  # per prompt token the worker has to compute
    load: float = 0.5  # per prompt token queued on the worker


@dataclass(frozen=True)
class RouteQuery:
    prompt_len: int
    hashes: Sequence[bytes]  # the prompt's full blocks
    block_size: int

    def uncached_tokens(self, cached_blocks: int) -> int:
        return max(self.prompt_len - cached_blocks * self.block_size, 0)


@dataclass(frozen=True)
class PrefillChoice:
    view: WorkerView
    cached_blocks: int  # predicted: the leading blocks the worker should find cached
    policy: str  # the policy that decided


class NoIndexedWorker(Exception):
    """None of the candidate workers is live in the prefix index."""


class PrefillPolicy(Protocol):
    name: str

    async def choose(self, views: Sequence[WorkerView], query: RouteQuery) -> PrefillChoice: ...

    def routed(self, choice: PrefillChoice, query: RouteQuery) -> None:
        """The request was sent to choice.view."""

    def prefill_done(self, choice: PrefillChoice, query: RouteQuery) -> None:
        """Its prefill ended (done or failed)."""


class _Turns:
    def __init__(self) -> None:
        self._count = itertools.count()

    def next(self) -> int:
        return next(self._count)


def _cheapest(
    views: Sequence[WorkerView],
    cached_blocks: Sequence[int],
    queued_tokens: Sequence[int],
    query: RouteQuery,
    weights: CostWeights,
    turn: int,
) -> int:
    """Index of the view of least cost; ties by requests in flight, then in turn."""
    count = len(views)

    def key(i: int) -> tuple[float, int, int]:
        cost = (
            weights.uncached * query.uncached_tokens(cached_blocks[i])
            + weights.load * queued_tokens[i]
        )
        return cost, views[i].inflight, (i - turn) % count

    return min(range(count), key=key)


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self) -> None:
        self._turns = _Turns()

    async def choose(self, views: Sequence[WorkerView], query: RouteQuery) -> PrefillChoice:
        return PrefillChoice(views[self._turns.next() % len(views)], 0, self.name)

    def routed(self, choice: PrefillChoice, query: RouteQuery) -> None:
        pass

    def prefill_done(self, choice: PrefillChoice, query: RouteQuery) -> None:
        pass


class LeastLoadPolicy:
    name = "least_load"

    def __init__(self) -> None:
        self._turns = _Turns()

    async def choose(self, views: Sequence[WorkerView], query: RouteQuery) -> PrefillChoice:
        turn = self._turns.next()
        count = len(views)
        best = min(
            range(count),
            key=lambda i: (views[i].queued_tokens, views[i].inflight, (i - turn) % count),
        )
        return PrefillChoice(views[best], 0, self.name)

    def routed(self, choice: PrefillChoice, query: RouteQuery) -> None:
        pass

    def prefill_done(self, choice: PrefillChoice, query: RouteQuery) -> None:
        pass


class ApproxPolicy:
    name = "approx"

    def __init__(self, weights: CostWeights, tree: ApproxPrefixTree | None = None) -> None:
        self.weights = weights
        self.tree = tree or ApproxPrefixTree()
        self._turns = _Turns()

    async def choose(self, views: Sequence[WorkerView], query: RouteQuery) -> PrefillChoice:
        depths = self.tree.depths(query.hashes, [v.addr for v in views])
        blocks = [depths[v.addr] for v in views]
        queued = [v.queued_uncached_tokens for v in views]
        best = _cheapest(views, blocks, queued, query, self.weights, self._turns.next())
        return PrefillChoice(views[best], blocks[best], self.name)

    def routed(self, choice: PrefillChoice, query: RouteQuery) -> None:
        self.tree.record(
            choice.view.addr, query.hashes, choice.view.num_pages or DEFAULT_CAPACITY_BLOCKS
        )

    def prefill_done(self, choice: PrefillChoice, query: RouteQuery) -> None:
        pass


class PrefixPolicy:
    """Redis-backed. This gateway's own routes count too, from when a prompt is sent until
    a few seconds after its prefill: a worker announces a prompt's blocks only once it has
    computed them (which may take long behind a queue), and a request sharing the prefix
    may arrive before that (it then waits behind the first one and finds them cached)."""

    name = "prefix"

    def __init__(
        self,
        reader: PrefixIndexReader,
        weights: CostWeights,
        *,
        recent_window_s: float = 5.0,
        on_lookup: Callable[[float], None] | None = None,
    ) -> None:
        self.reader = reader
        self.weights = weights
        self.recent = ApproxPrefixTree(max_age_s=recent_window_s)
        self._on_lookup = on_lookup
        self._turns = _Turns()

    async def choose(self, views: Sequence[WorkerView], query: RouteQuery) -> PrefillChoice:
        started = time.perf_counter()
        matches = await self.reader.match(query.hashes)  # raises PrefixIndexUnavailable
        if self._on_lookup is not None:
            self._on_lookup(time.perf_counter() - started)
        by_addr = {m.status.address: m for m in matches.values()}
        live: list[tuple[WorkerView, WorkerMatch]] = []
        for view in views:
            match = matches.get(view.worker_id) if view.worker_id else None
            match = match or by_addr.get(view.addr)
            if match is not None:  # a worker whose liveness expired is never chosen
                live.append((view, match))
        if not live:
            raise NoIndexedWorker(f"none of {[v.addr for v in views]} is live in the index")
        candidates = [view for view, _ in live]
        recent = self.recent.depths(query.hashes, [v.addr for v in candidates])
        blocks = [max(m.blocks, recent[v.addr]) for v, m in live]
        # This gateway's own queue is exact; the reported one adds what other gateways sent.
        queued = [
            v.queued_uncached_tokens
            + v.others_queued_tokens(m.status.queued_tokens, m.status.updated_at)
            for v, m in live
        ]
        best = _cheapest(candidates, blocks, queued, query, self.weights, self._turns.next())
        return PrefillChoice(candidates[best], blocks[best], self.name)

    def routed(self, choice: PrefillChoice, query: RouteQuery) -> None:
        self.recent.record(choice.view.addr, query.hashes, pinned=True)

    def prefill_done(self, choice: PrefillChoice, query: RouteQuery) -> None:
        # From now on Redis tells; the window covers the announcement's way there.
        self.recent.record(choice.view.addr, query.hashes)
