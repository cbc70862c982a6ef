"""One load point: sessions arrive on schedule, turns run under the concurrency cap.

Bounded twice: by the sessions planned (the request count) and by `duration_s`, after
which nothing new is sent and whatever is still running gets `drain_timeout_s` to finish
before it is cancelled (and recorded as `cancelled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import numpy as np

from loadtest.arrivals import arrival_offsets
from loadtest.client import EndpointConfig, StreamResult, cancelled_result, stream_request
from loadtest.datasets import Session, Turn
from loadtest.records import CountSource, LoadPoint, RequestRecord
from loadtest.stats import tpot_ms
from loadtest.tokens import TokenCounter

Prompt = str | list[dict[str, str]]


@dataclass
class PointPlan:
    index: int
    load: LoadPoint
    sessions: list[Session]
    duration_s: float | None = None
    drain_timeout_s: float = 60.0
    seed: int = 0

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def build_prompt(config: EndpointConfig, session: Session, history: list[tuple[str, str]],
                 turn: Turn) -> Prompt:
    """The request for `turn`: the shared prefix, earlier turns with their answers, the turn."""
    if config.endpoint == "chat":
        messages = [{"role": "system", "content": session.system}] if session.system else []
        for asked, answered in history:
            messages += [{"role": "user", "content": asked},
                         {"role": "assistant", "content": answered}]
        return [*messages, {"role": "user", "content": turn.text}]
    parts = [session.system or ""] + [p for pair in history for p in pair] + [turn.text]
    return "\n\n".join(p for p in parts if p)


def _count_prompt(counter: TokenCounter, prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return counter.count_completion_prompt(prompt)
    return counter.count_chat_prompt(prompt)


def to_record(ctx: PlanContext, session: Session, turn_index: int, prompt: Prompt,
              result: StreamResult, request_index: int) -> RequestRecord:
    counter = ctx.counter
    prompt_source: CountSource = "usage"
    prompt_tokens = result.usage_prompt_tokens
    if prompt_tokens is None:
        prompt_source = "tokenizer" if counter.exact else "approx"
        prompt_tokens = _count_prompt(counter, prompt)
    output_source: CountSource = "usage"
    output_tokens = result.usage_completion_tokens
    if output_tokens is None:
        if counter.exact:
            output_source, output_tokens = "tokenizer", len(counter.encode(result.text))
        else:
            output_source, output_tokens = "chunks", result.content_chunks
    tpot = None
    if result.ok and result.e2e_ms is not None and result.ttft_ms is not None:
        tpot = tpot_ms(result.e2e_ms, result.ttft_ms, output_tokens)
    started = result.started_at or time.perf_counter()
    return RequestRecord(
        point=ctx.point, request_index=request_index, session_id=session.session_id,
        turn=turn_index, group=session.group, source_id=session.source_id,
        start_ms=(started - ctx.t0) * 1e3, ok=result.ok, error_type=result.error_type,
        error_message=result.error_message, http_status=result.http_status,
        requested_output_tokens=session.turns[turn_index].output_len,
        prompt_tokens=prompt_tokens, prompt_tokens_source=prompt_source,
        output_tokens=output_tokens if result.ok else 0, output_tokens_source=output_source,
        ttft_ms=result.ttft_ms, e2e_ms=result.e2e_ms, tpot_ms=tpot,
        itl_ms=result.itl_ms if result.ok else [],
    )


@dataclass
class PlanContext:
    """What every session task of one point shares."""

    point: int
    client: httpx.AsyncClient
    config: EndpointConfig
    counter: TokenCounter
    t0: float
    deadline: float
    limit: asyncio.Semaphore | None
    records: list[RequestRecord]
    on_done: Callable[[RequestRecord], None]
    dispatched: int = 0


@contextlib.asynccontextmanager
async def _slot(limit: asyncio.Semaphore | None) -> AsyncIterator[None]:
    if limit is None:
        yield
    else:
        async with limit:
            yield


async def run_session(ctx: PlanContext, session: Session) -> None:
    history: list[tuple[str, str]] = []
    for turn_index, turn in enumerate(session.turns):
        async with _slot(ctx.limit):
            if time.perf_counter() >= ctx.deadline:
                return  # out of time: later turns are never sent
            prompt = build_prompt(ctx.config, session, history, turn)
            request_index = ctx.dispatched
            ctx.dispatched += 1
            result = cancelled_result()
            result.started_at = time.perf_counter()
            try:
                result = await stream_request(ctx.client, ctx.config, prompt, turn.output_len)
            finally:
                # A cancelled request (deadline) is recorded too, then the cancel goes on.
                record = to_record(ctx, session, turn_index, prompt, result, request_index)
                ctx.records.append(record)
                ctx.on_done(record)
        if not result.ok:
            return  # a conversation cannot go on without its answer
        history.append((turn.text, result.text))


async def run_point(client: httpx.AsyncClient, config: EndpointConfig, counter: TokenCounter,
                    plan: PointPlan,
                    on_done: Callable[[RequestRecord], None]) -> list[RequestRecord]:
    rng = np.random.default_rng(plan.seed)
    offsets = arrival_offsets(len(plan.sessions), plan.load.request_rate,
                              plan.load.burstiness, rng)
    t0 = time.perf_counter()
    deadline = t0 + plan.duration_s if plan.duration_s else float("inf")
    limit = asyncio.Semaphore(plan.load.max_concurrency) if plan.load.max_concurrency else None
    ctx = PlanContext(plan.index, client, config, counter, t0, deadline, limit, [], on_done)
    tasks: list[asyncio.Task[None]] = []
    for session, offset in zip(plan.sessions, offsets, strict=True):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.perf_counter())))
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(run_session(ctx, session)))
    if tasks:
        drain = None
        if plan.duration_s:
            drain = max(0.0, deadline - time.perf_counter()) + plan.drain_timeout_s
        _, pending = await asyncio.wait(tasks, timeout=drain)
        for task in pending:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome  # a bug in the load tester, not a server failure
    return sorted(ctx.records, key=lambda r: r.request_index)
