"""One request across the two workers: reserve on decode, prefill into it, stream the rest.

    D.Generate(...)  -> first event `reserved`: decode's pages for the prompt
    P.Prefill(..., kv_target=reserved) -> first token (prefill writes the KV into D)
    D's stream       -> the other tokens; the last batch carries finish_reason

The gateway turns tokens into text (stop strings included) and cancels whatever call is
still open when it is done early, fails, or the client goes away: cancelling Generate
is how decode frees the request's pages.

A pair that fails before anything reached the client (a worker down, unreachable, or lost
mid-call) is replaced by another pair, up to MAX_ATTEMPTS times within the request's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import grpc.aio

from services.drain import is_draining
from services.gateway.detokenizer import OutputText
from services.gateway.errors import UNAVAILABLE, APIError
from services.gateway.logprobs import TokenLogprob, from_wire
from services.gateway.routed_experts import RoutedExperts
from services.gateway.router import Route, Router
from services.gateway.sampling import GenerationPlan
from services.gateway.tokenizer import ModelInfo
from services.gateway.worker_clients import WorkerClient
from shared.observability.request_id import grpc_metadata, traced_request_id
from shared.observability.request_metrics import observe_event, observe_retry
from shared.rpc import kvrelay_pb2 as pb

logger = logging.getLogger("kvrelay.gateway")

# Tries of one request on different prefill/decode pairs, while nothing has been streamed.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class TextDelta:
    text: str
    index: int = 0  # the choice (0 .. n-1)
    # With plan.logprobs: the tokens whose text this is (tokens held back come later).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of one choice; a request with n choices ends after n of these."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # of this choice
    cached_tokens: int = 0  # prompt tokens whose KV prefill found in its prefix cache
    index: int = 0
    routed_experts: str | None = None  # with return_routed_experts (routed_experts.py)


GenerationEvent = TextDelta | Finished
CallT = TypeVar("CallT", bound=grpc.aio.Call)


class WorkerProtocolError(Exception):
    """A worker answered something the control-plane contract does not allow."""


_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
}
_CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


def rpc_error_to_api(worker: WorkerClient, exc: grpc.aio.AioRpcError) -> APIError:
    return rpc_status_to_api(worker, exc.code(), exc.details())


class WorkerFailure(APIError):
    """An APIError caused by one worker: a retry goes to another one."""

    def __init__(self, worker: WorkerClient, status: int, message: str, **kwargs: str | None
                 ) -> None:
        super().__init__(status, message, **kwargs)
        self.worker = worker


def rpc_status_to_api(worker: WorkerClient, code: grpc.StatusCode, details: str | None) -> APIError:
    details = details or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        if is_draining(details):
            worker.mark_draining(details)  # its other calls are finishing: leave them be
        else:
            worker.mark_failed(details)
    message = f"{worker!r} failed: {code.name}: {details}"
    if code in _CLIENT_CODES:
        return APIError(400, message, code=code.name.lower())
    if code in _UNAVAILABLE_CODES:
        return WorkerFailure(worker, 503, message, type=UNAVAILABLE, code=code.name.lower())
    return APIError(500, message, code=code.name.lower())


def _lost_worker(route: Route, since: float) -> WorkerClient | None:
    """The worker of this pair whose calls were abandoned (it failed) since `since`."""
    for worker in (route.prefill, route.decode):
        if worker is not None and worker.abandoned_at >= since:
            return worker
    return None


def _cancel_if_open(call: grpc.aio.Call | None) -> None:
    if call is not None and not call.done():
        call.cancel()


def _worker_lost(worker: WorkerClient) -> APIError:
    return WorkerFailure(worker, 503, f"{worker!r} stopped answering during the request",
                         type=UNAVAILABLE, code="worker_lost")


def _retryable(error: APIError) -> bool:
    """A worker was unavailable, full or lost: another pair may well answer."""
    return error.status == 503 and error.code != "shutdown"


@dataclass
class _Progress:
    """What the answer looks like so far, in tokens."""

    plan: GenerationPlan
    stop_ids: frozenset[int] = field(init=False)
    completion_tokens: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.stop_ids = frozenset(self.plan.stop_token_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, token_ids: Iterable[int]) -> list[int]:
        """Counts new tokens; returns those to show. A stop token ends it and is not shown."""
        shown: list[int] = []
        for tok in token_ids:
            if self.finish_reason is not None:
                break  # a worker sent more than asked for: the answer is already complete
            self.completion_tokens += 1
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                break
            shown.append(tok)
            if self.completion_tokens >= self.plan.max_new_tokens:
                self.finish_reason = "length"
        return shown


@dataclass
class _Choice:
    """One choice of the answer: its tokens so far and its text (stop strings applied)."""

    index: int
    progress: _Progress
    output: OutputText
    finished: bool = False  # its Finished event is out
    decode_finished: bool = False  # decode said this choice ended
    logprobs: list[TokenLogprob] = field(default_factory=list)  # shown, text not out yet
    routed: RoutedExperts | None = None  # with return_routed_experts

    @property
    def open(self) -> bool:
        return not (self.progress.done or self.output.stopped)

    def add(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob] | None = None
    ) -> list[GenerationEvent]:
        stopped = self.output.stopped
        shown = self.progress.take(token_ids)
        if logprobs is not None and not stopped:
            self.logprobs.extend(logprobs[: len(shown)])
        text = self.output.add(shown)
        return [self._delta(text)] if text else []

    def _delta(self, text: str) -> TextDelta:
        delta = TextDelta(text, self.index, tuple(self.logprobs))
        self.logprobs.clear()
        return delta

    def close(self, plan: GenerationPlan, cached_tokens: int) -> list[GenerationEvent]:
        """The rest of its text and its Finished event, once."""
        if self.finished:
            return []
        self.finished = True
        text = self.output.finish()
        events: list[GenerationEvent] = [self._delta(text)] if text or self.logprobs else []
        finish_reason = "stop" if self.output.stopped else (self.progress.finish_reason or "length")
        completion_tokens = self.progress.completion_tokens
        events.append(
            Finished(
                finish_reason,
                plan.prompt_len,
                completion_tokens,
                cached_tokens,
                self.index,
                self.routed.encode(completion_tokens) if self.routed is not None else None,
            )
        )
        return events


class Generator:
    def __init__(self, model: ModelInfo, router: Router, timeout_s: float) -> None:
        self._model = model
        self._router = router
        self._timeout_s = timeout_s
        self._open_calls: set[grpc.aio.Call] = set()
        self._closing = False

    def shutdown(self) -> None:
        """Ends every request in flight with a 503 (at the end of the shutdown grace period).

        Cancelling their worker calls wakes them up; they then report the shutdown to their
        clients instead of being cut off mid-stream.
        """
        self._closing = True
        for call in list(self._open_calls):
            call.cancel()

    def _track(self, call: CallT) -> CallT:
        self._open_calls.add(call)
        call.add_done_callback(self._open_calls.discard)
        return call

    @staticmethod
    def _shutdown_error() -> APIError:
        return APIError(503, "the gateway is shutting down", type=UNAVAILABLE, code="shutdown")

    async def generate(self, plan: GenerationPlan) -> AsyncGenerator[GenerationEvent, None]:
        """Text deltas as they come, then one Finished. Raises APIError on failure."""
        if self._closing:
            raise self._shutdown_error()
        deadline = time.monotonic() + self._timeout_s
        failed: set[WorkerClient] = set()  # workers that failed this request: not again
        for attempt in range(1, MAX_ATTEMPTS + 1):
            route = await self._router.route(
                plan.prompt_token_ids,
                needs_decode=plan.max_new_tokens > 1,
                cache_salt=plan.cache_salt,
                lora=plan.lora_key,
                exclude=failed,
            )
            # A fresh id per attempt: the old one may still be winding down on a worker.
            request_id = plan.request_id if attempt == 1 else f"{plan.request_id}-{attempt}"
            request_id = traced_request_id(request_id)  # the client's id leads: logs, KV channel
            emitted = False
            try:
                async with aclosing(self._attempt(plan, route, request_id, deadline)) as events:
                    async for event in events:
                        emitted = True
                        observe_event(event)
                        yield event
                return
            except APIError as exc:
                last_try = attempt == MAX_ATTEMPTS or time.monotonic() >= deadline
                if emitted or last_try or self._closing or not _retryable(exc):
                    raise
                if isinstance(exc, WorkerFailure):
                    failed.add(exc.worker)
                observe_retry()
                logger.warning(
                    "%s: attempt %d (%s -> %s) failed before any output, retrying: %s",
                    plan.request_id,
                    attempt,
                    route.prefill.addr,
                    route.decode.addr if route.decode else "-",
                    exc.message,
                )
            finally:
                route.release()  # the router's load figures: this attempt is over

    async def _attempt(
        self, plan: GenerationPlan, route: Route, request_id: str, deadline: float
    ) -> AsyncGenerator[GenerationEvent, None]:
        """One try on one prefill/decode pair."""
        choices = [
            _Choice(i, _Progress(plan), OutputText(self._model.tokenizer, plan.stop_strings))
            for i in range(plan.n)
        ]
        decode_call: grpc.aio.UnaryStreamCall | None = None
        prefill_call: grpc.aio.UnaryUnaryCall | None = None
        current: WorkerClient = route.prefill  # the worker whose answer is awaited
        decode_done = False
        started = time.monotonic()
        try:
            kv_target: pb.KvTarget | None = None
            if route.decode is not None:
                current = route.decode
                decode_call = self._track(
                    route.decode.decode_stub().Generate(
                        pb.GenerateRequest(
                            request_id=request_id,
                            prompt_token_ids=plan.prompt_token_ids,
                            sampling=plan.sampling_params(),
                            lora=plan.lora or "",
                        ),
                        timeout=max(deadline - time.monotonic(), 0.001),
                        metadata=route.decode.metadata(grpc_metadata()),
                    )
                )
                route.decode.track(decode_call)
                kv_target = await self._read_reserved(decode_call, route)

            current = route.prefill
            prefill_call = self._track(
                route.prefill.prefill_stub().Prefill(
                    pb.PrefillRequest(
                        request_id=request_id,
                        prompt_token_ids=plan.prompt_token_ids,
                        sampling=plan.sampling_params(),
                        kv_target=kv_target,
                        cache_salt=plan.cache_salt or "",
                        lora=plan.lora or "",
                    ),
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=route.prefill.metadata(grpc_metadata()),
                )
            )
            route.prefill.track(prefill_call)
            if route.decode is not None:
                route.decode.track(prefill_call)  # its KV goes to decode: useless if decode is lost
            if decode_call is not None:
                # Decode's stream ends before prefill is done only when decode failed (or
                # died): stop waiting for a prefill whose KV has nowhere to go.
                decode_call.add_done_callback(lambda _: _cancel_if_open(prefill_call))
            first = await prefill_call
            route.prefill_done(first.cached_tokens)
            ttft = time.monotonic() - started
            if decode_call is not None and decode_call.done():
                # Decode failed while prefill worked (e.g. it died): nothing is out yet, so the
                # request can still go to another pair.
                decode_code = await decode_call.code()
                if decode_code != grpc.StatusCode.OK:
                    assert route.decode is not None
                    raise rpc_status_to_api(route.decode, decode_code, await decode_call.details())

            if len(first.first_token_ids) != plan.n:
                raise WorkerProtocolError(
                    f"{route.prefill!r} sampled {len(first.first_token_ids)} first tokens "
                    f"for {plan.n} choices"
                )
            if plan.return_routed_experts:
                rows = first.routed_experts
                if not rows or len(rows) % plan.prompt_len:
                    raise WorkerProtocolError(
                        f"{route.prefill!r} sent {len(rows)} bytes of routed experts "
                        f"for {plan.prompt_len} prompt tokens"
                    )
                for choice in choices:
                    choice.routed = RoutedExperts(rows, plan.prompt_len)
            for choice, token in zip(choices, first.first_token_ids, strict=True):
                logprobs = None
                if plan.logprobs:
                    i = choice.index
                    tops = first.first_token_top_logprobs[i : i + 1]
                    logprobs = from_wire([token], first.first_token_logprobs[i : i + 1], tops)
                for out in choice.add([token], logprobs):
                    yield out

            if route.decode is not None and decode_call is not None:
                current = route.decode
                while any(c.open for c in choices):
                    event = await decode_call.read()
                    if event is grpc.aio.EOF:
                        decode_done = True
                        raise WorkerProtocolError(
                            f"{route.decode!r} ended the stream before the answer was finished"
                        )
                    assert isinstance(event, pb.GenerateEvent)
                    if event.WhichOneof("event") != "tokens":
                        raise WorkerProtocolError(
                            f"{route.decode!r} sent a {event.WhichOneof('event')!r} event "
                            "after the reservation"
                        )
                    batch = event.tokens
                    if batch.index >= plan.n:
                        raise WorkerProtocolError(
                            f"{route.decode!r} sent tokens of choice {batch.index} of {plan.n}"
                        )
                    choice = choices[batch.index]
                    if batch.finish_reason:
                        choice.decode_finished = True
                    if choice.finished:
                        continue  # ended by a stop string while decode went on with it
                    if choice.routed is not None:
                        choice.routed.add(batch.routed_experts)
                    logprobs = None
                    if plan.logprobs:
                        logprobs = from_wire(batch.token_ids, batch.logprobs, batch.top_logprobs)
                    for out in choice.add(batch.token_ids, logprobs):
                        yield out
                    if batch.finish_reason and not choice.progress.done:
                        # Decode's own verdict. Its "stop" is a stop token that it does not
                        # send: count it, as the first token is counted when it is one.
                        choice.progress.finish_reason = batch.finish_reason
                        if batch.finish_reason == "stop":
                            choice.progress.completion_tokens += 1
                    if not choice.open:
                        for out in choice.close(plan, first.cached_tokens):
                            yield out
                decode_done = all(c.decode_finished for c in choices)
            else:
                for choice in choices:
                    if not choice.progress.done:
                        # Prefill alone (max_tokens == 1): its token is the whole answer.
                        choice.progress.finish_reason = "length"

            for choice in choices:
                for out in choice.close(plan, first.cached_tokens):
                    yield out
            logger.debug(
                "%s done: prompt=%d completion=%s finish=%s ttft=%.3fs total=%.3fs %s -> %s",
                request_id,
                plan.prompt_len,
                [c.progress.completion_tokens for c in choices],
                [c.progress.finish_reason for c in choices],
                ttft,
                time.monotonic() - started,
                route.prefill.addr,
                route.decode.addr if route.decode else "-",
            )

            if decode_done and decode_call is not None:
                await self._drain(decode_call)
        except grpc.aio.AioRpcError as exc:
            lost = _lost_worker(route, started)
            if exc.code() == grpc.StatusCode.CANCELLED and lost is not None:
                # A stream read reports our own cancel as CANCELLED rather than CancelledError.
                raise _worker_lost(lost) from exc
            decode_failed = (
                current is route.prefill
                and route.decode is not None
                and decode_call is not None
                and decode_call.done()
                and await decode_call.code() != grpc.StatusCode.OK
            )
            if decode_failed and route.decode is not None and decode_call is not None:
                # Prefill often fails *because* decode gave up (e.g. the KV transfer broke, or
                # decode died): blame decode, not the prefill worker.
                decode_code = await decode_call.code()
                decode_details = await decode_call.details()
                err = rpc_status_to_api(route.decode, decode_code, decode_details)
                err.message += f" (prefill call ended with {exc.code().name}: {exc.details()})"
            else:
                err = rpc_error_to_api(current, exc)
            raise err from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # Our own calls were cancelled, not this task by its owner: by shutdown(), or
                # because a worker of this pair failed (health check, broken call) mid-call.
                if self._closing:
                    raise self._shutdown_error() from None
                if (
                    route.decode is not None
                    and decode_call is not None
                    and decode_call.done()
                    and current is route.prefill
                ):
                    decode_code = await decode_call.code()
                    if decode_code != grpc.StatusCode.OK:
                        details = await decode_call.details()
                        raise rpc_status_to_api(route.decode, decode_code, details) from None
                lost = _lost_worker(route, started)
                if lost is not None:
                    raise _worker_lost(lost) from None
            raise
        except WorkerProtocolError as exc:
            logger.error("%s: %s", request_id, exc)
            raise APIError(500, str(exc)) from exc
        finally:
            # Whatever happened (done early, error, client gone), nothing stays open.
            for call in (decode_call, prefill_call):
                if call is not None and not call.done():
                    call.cancel()

    async def _drain(self, call: grpc.aio.UnaryStreamCall) -> None:
        """Decode finished on its own: let its call end normally rather than cancel it."""
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            # The answer is already out; a late error only matters to the logs.
            logger.debug("decode call ended with %s after finishing", exc.code().name)
        except asyncio.CancelledError:
            # Our call cancelled (shutdown, or its worker failed) after the answer was out:
            # nothing to report. The task itself being cancelled is another matter.
            task = asyncio.current_task()
            if task is None or task.cancelling() > 0:
                raise

    @staticmethod
    async def _read_reserved(call: grpc.aio.UnaryStreamCall, route: Route) -> pb.KvTarget:
        event = await call.read()
        if event is grpc.aio.EOF:
            raise WorkerProtocolError(f"{route.decode!r} closed the stream without reserving")
        assert isinstance(event, pb.GenerateEvent)
        if event.WhichOneof("event") != "reserved":
            raise WorkerProtocolError(
                f"{route.decode!r} sent {event.WhichOneof('event')!r} first, not 'reserved'"
            )
        return event.reserved
