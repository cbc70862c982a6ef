"""Prefill engine: batches prompts into forward steps, relays their KV as it is computed.

One engine thread owns the model and the KV sender. Each step takes the waiting prompts
in arrival order until the step's token budget is spent: several short prompts share a
step, and a long prompt is cut into chunks (`chunked_prefill_size`) so it never holds up
the others for long. A prompt's cached prefix pages go to decode before anything is
computed, then each chunk's full pages as soon as the chunk is done: ZeroMQ moves them
while the next chunk computes. The last chunk's logits give the first answer token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from shared.block_hash import block_hashes
from shared.grammar import GrammarBackend, TokenMask, fill_masks
from shared.kv_pool import KVPoolExhausted
from shared.model.lora import LoraAdapter
from shared.model.runner import ModelRunner, SeqSlice
from shared.observability.request_id import request_log_extra
from shared.prefix_cache import PrefixCache
from shared.sampler import SamplingParams, TokenHistory, TopLogprobs, sample_tokens
from shared.transfer import KvSender, KvTransferError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class KvDestination:
    endpoint: str
    page_ids: list[int]


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    destination: KvDestination | None
    cache_salt: str | None = None
    lora: LoraAdapter | None = None  # its key enters the block hashes: no cache across adapters


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_ids: list[int]  # one per choice (params.n), sampled from the same logits
    first_token_logprobs: list[float]
    kv_bytes_sent: int
    cached_tokens: int
    queue_s: float
    compute_s: float
    # One per choice when params.top_logprobs > 0: the first token's alternatives.
    first_token_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # With params.return_routed_experts: int32 LE [prompt tokens, layers, top_k].
    routed_experts: bytes = b""


@dataclass(frozen=True)
class PrefillLimits:
    max_prefill_tokens: int = 4096  # tokens computed in one step, all prompts together
    chunked_prefill_size: int = 2048  # longest piece of one prompt in one step


@dataclass
class PrefillStats:
    steps: int = 0
    largest_batch: int = 0  # most prompts computed together in one step
    tokens_computed: int = 0
    tokens_cached: int = 0


@dataclass
class _Task:
    job: PrefillJob
    future: Future[PrefillOutcome]
    submitted: float
    hashes: list[bytes] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    computed: int = 0  # prompt tokens whose KV is in `pages`
    pages_sent: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0
    started: float = 0.0
    routing: list[torch.Tensor] = field(default_factory=list)  # experts of each chunk

    @property
    def remaining(self) -> int:
        return len(self.job.prompt) - self.computed


class PrefillEngine:
    def __init__(
        self,
        runner: ModelRunner,
        sender: KvSender,
        model_name: str,
        cache: PrefixCache,
        limits: PrefillLimits | None = None,
    ) -> None:
        self.runner = runner
        self.sender = sender
        self.model_name = model_name
        self.cache = cache
        self.limits = limits or PrefillLimits()
        page_size = runner.pool.page_size
        if self.limits.chunked_prefill_size % page_size:
            raise ValueError(f"chunked_prefill_size must be a multiple of {page_size}")
        self._inbox: queue.SimpleQueue[_Task | _Call | _Wake | None] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._waiting: list[_Task] = []  # admitted in order, not yet holding pages
        self._running: list[_Task] = []  # holding pages, partly computed
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)
        self.stats = PrefillStats()
        self.grammars = GrammarBackend(runner.model_dir, runner.config.vocab_size)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        """False once the engine thread has died (its worker must not look healthy)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def submit(self, job: PrefillJob) -> Future[PrefillOutcome]:
        self._validate(job)
        future: Future[PrefillOutcome] = Future()
        # Running from the start: a caller that goes away cancels through cancel(), never
        # the future itself (a cancelled future would refuse the engine's late result).
        future.set_running_or_notify_cancel()
        self._inbox.put(_Task(job, future, time.perf_counter()))
        return future

    def run_on_engine(self, fn: Callable[[], T]) -> Future[T]:
        """Runs fn on the engine thread, between two steps (the thread owns the model and
        the pool): embeddings use it."""
        future: Future[T] = Future()
        self._inbox.put(_Call(fn, future))
        return future

    def cancel(self, request_id: str) -> None:
        """Drops a job at the next step boundary (its caller has gone)."""
        with self._cancel_lock:
            self._cancelled.add(request_id)
        self._inbox.put(_WAKE)

    @property
    def num_queued(self) -> int:
        return len(self._waiting) + len(self._running) + self._inbox.qsize()

    def _validate(self, job: PrefillJob) -> None:
        pool = self.runner.pool
        if not job.prompt:
            raise ValueError("empty prompt")
        if len(job.prompt) >= self.runner.config.max_context:
            raise ValueError(
                f"prompt of {len(job.prompt)} tokens exceeds the context of "
                f"{self.runner.config.max_context}"
            )
        needed = pool.pages_for(len(job.prompt))
        if needed > pool.num_pages:
            raise ValueError(
                f"prompt needs {needed} KV pages; this prefill worker has {pool.num_pages}"
            )
        if job.destination is not None and len(job.destination.page_ids) != needed:
            raise ValueError("reserved decode pages do not fit the prompt")
        if job.lora is not None and self.runner.lora is None:
            raise ValueError(f"LoRA adapter {job.lora.name!r} but this worker has no LoRA")

    # --- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            idle = not (self._waiting or self._running)
            try:
                item = self._inbox.get(block=idle)
            except queue.Empty:
                item = _WAKE
            if item is None:
                break
            if isinstance(item, _Task):
                self._waiting.append(item)
            elif isinstance(item, _Call):
                item.run()
            while True:  # drain whatever else arrived
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._shutdown()
                    return
                if isinstance(more, _Task):
                    self._waiting.append(more)
                elif isinstance(more, _Call):
                    more.run()
            self._drop_cancelled()
            self._admit()
            if self._running:
                self._step()
        self._shutdown()

    def _drop_cancelled(self) -> None:
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for tasks in (self._waiting, self._running):
            for task in [t for t in tasks if t.job.request_id in cancelled]:
                tasks.remove(task)
                log.info(
                    "request %s: dropped, its caller cancelled (%d of %d tokens computed)",
                    task.job.request_id,
                    task.computed,
                    len(task.job.prompt),
                    extra=request_log_extra(task.job.request_id),
                )
                self._fail(task, KvTransferError("cancelled by the caller"), tell_decode=True)

    def _admit(self) -> None:
        """Gives pages to waiting tasks in arrival order while the pool has them."""
        pool = self.runner.pool
        while self._waiting:
            task = self._waiting[0]
            job = task.job
            if not task.hashes:
                task.hashes = block_hashes(
                    job.prompt,
                    pool.page_size,
                    model=self.model_name,
                    lora=job.lora.key if job.lora is not None else None,
                    cache_salt=job.cache_salt,
                )
            # At least one token is computed: its logits give the first answer token.
            reusable = (len(job.prompt) - 1) // pool.page_size
            if job.params.return_routed_experts:
                reusable = 0  # cached tokens would have no routing: compute them all
            cached = self.cache.match(task.hashes, max_blocks=reusable)
            try:
                fresh = self.cache.allocate(pool.pages_for(len(job.prompt)) - len(cached.pages))
            except KVPoolExhausted as exc:
                pool.free(cached.pages)
                if not self._running:
                    # Nothing will free pages: with an idle engine this cannot fit at all.
                    self._waiting.pop(0)
                    self._fail(task, exc, tell_decode=True)
                    continue
                return  # wait for running tasks to finish
            self._waiting.pop(0)
            task.pages = cached.pages + fresh
            task.cached_tokens = task.computed = cached.num_tokens
            self.stats.tokens_cached += cached.num_tokens
            task.started = time.perf_counter()
            self._running.append(task)
            try:
                self._send_ready_pages(task, cached.num_tokens // pool.page_size)
            except KvTransferError as exc:
                self._running.remove(task)
                self._fail(task, exc, tell_decode=False)

    def _step(self) -> None:
        budget = self.limits.max_prefill_tokens
        batch: list[tuple[_Task, int]] = []
        adapters = self.runner.lora.budget() if self.runner.lora is not None else None
        for task in self._running:
            if budget <= 0:
                break
            if adapters is not None and not adapters.admit(task.job.lora):
                continue  # its adapter finds no slot in this step: the next one
            take = min(task.remaining, self.limits.chunked_prefill_size, budget)
            batch.append((task, take))
            budget -= take
        slices = [
            SeqSlice(
                t.job.prompt[t.computed : t.computed + n],
                t.computed,
                t.pages,
                t.job.lora,
                record_routing=t.job.params.return_routed_experts,
            )
            for t, n in batch
        ]
        self.stats.steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.tokens_computed += sum(n for _, n in batch)
        try:
            logits = self.runner.forward(slices)
        except Exception as exc:
            log.exception("prefill step failed")
            for task, _ in batch:
                self._running.remove(task)
                self._fail(task, exc, tell_decode=True)
            return
        finished: list[tuple[int, _Task]] = []
        page_size = self.runner.pool.page_size
        routed = self.runner.routed_experts
        for row, (task, n) in enumerate(batch):
            task.computed += n
            if routed and (rows := routed[row]) is not None:
                task.routing.append(rows)
            if task.remaining == 0:
                finished.append((row, task))
                continue
            try:
                self._send_ready_pages(task, task.computed // page_size)
            except KvTransferError as exc:
                self._running.remove(task)
                self._fail(task, exc, tell_decode=False)
        for row, task in finished:
            self._running.remove(task)
            params = task.job.params
            try:
                tokens, logprobs, top = sample_tokens(
                    logits[row : row + 1].expand(params.n, -1),
                    [params.for_choice(i) for i in range(params.n)],
                    [0] * params.n,
                    histories=[TokenHistory(task.job.prompt, ())] * params.n,
                    mask=self._first_token_mask(params),
                )
            except ValueError as exc:  # parameters the sampler refuses fail their request
                self._fail(task, exc, tell_decode=True)
                continue
            self._complete(task, tokens, logprobs, top if params.top_logprobs else [])

    def _first_token_mask(self, params: SamplingParams) -> TokenMask | None:
        """The grammar's mask at the start of the answer, for each of the n choices."""
        if params.grammar is None:
            return None
        grammar = self.grammars.matcher(params.grammar, params.stop_token_ids)
        mask = fill_masks([grammar], self.grammars.vocab_size)
        return mask.expand(params.n) if mask is not None else None

    def _send_ready_pages(self, task: _Task, upto: int) -> None:
        """Sends pages [pages_sent, upto) of the task to its decode worker, if it has one."""
        destination = task.job.destination
        if destination is None or upto <= task.pages_sent:
            return
        sent, chunks = self.sender.send_pages(
            request_id=task.job.request_id,
            endpoint=destination.endpoint,
            pool=self.runner.pool,
            src_page_ids=task.pages[task.pages_sent : upto],
            dst_page_ids=destination.page_ids[task.pages_sent : upto],
        )
        task.pages_sent = upto
        task.bytes_sent += sent
        task.chunks_sent += chunks

    def _complete(
        self,
        task: _Task,
        tokens: list[int],
        logprobs: list[float],
        top: list[TopLogprobs] | None = None,
    ) -> None:
        job = task.job
        try:
            self._send_ready_pages(task, len(task.pages))
            if job.destination is not None:
                self.sender.send_done(
                    request_id=job.request_id,
                    endpoint=job.destination.endpoint,
                    num_tokens=len(job.prompt),
                    num_chunks=task.chunks_sent,
                    first_token_ids=tokens,
                    first_token_logprobs=logprobs,
                )
        except KvTransferError as exc:
            self._fail(task, exc, tell_decode=False)
            return
        self.cache.insert(task.hashes, task.pages)
        self.runner.pool.free(task.pages)
        now = time.perf_counter()
        log.info(
            "request %s: prefill %d tokens (%d cached) in %.1f ms after %.1f ms queued, "
            "KV %d bytes",
            job.request_id,
            len(job.prompt),
            task.cached_tokens,
            (now - task.started) * 1e3,
            (task.started - task.submitted) * 1e3,
            task.bytes_sent,
            extra=request_log_extra(job.request_id),
        )
        routed = b""
        if task.routing:
            routed = torch.cat(task.routing).numpy().astype("<i4", copy=False).tobytes()
        task.future.set_result(
            PrefillOutcome(
                tokens,
                logprobs,
                task.bytes_sent,
                task.cached_tokens,
                task.started - task.submitted,
                now - task.started,
                top or [],
                routed,
            )
        )

    def _fail(self, task: _Task, exc: BaseException, tell_decode: bool) -> None:
        job = task.job
        if task.pages:
            self.runner.pool.free(task.pages)
            task.pages = []
        if tell_decode and job.destination is not None:
            # Decode frees its reserved pages now instead of waiting for its timeout.
            try:
                self.sender.abort(
                    request_id=job.request_id,
                    endpoint=job.destination.endpoint,
                    reason=f"prefill failed: {exc}",
                )
            except KvTransferError:
                log.warning("request %s: could not tell decode about the abort", job.request_id)
        if not task.future.done():
            task.future.set_exception(exc)

    def _shutdown(self) -> None:
        for task in self._waiting + self._running:
            self._fail(task, KvTransferError("prefill worker shutting down"), tell_decode=True)
        self._waiting.clear()
        self._running.clear()


class _Wake:
    """Inbox marker that only wakes the engine thread."""


@dataclass
class _Call:
    """A function to run on the engine thread, and where its result goes."""

    fn: Callable[[], Any]
    future: Future[Any]

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except Exception as exc:
            self.future.set_exception(exc)


_WAKE = _Wake()
