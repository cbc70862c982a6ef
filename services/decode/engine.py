"""Decode engine: continuous batching over the sequences whose KV has arrived.

One engine thread owns the model. Every step runs one batched forward over all
running sequences; sequences join and leave between steps.

In colocated mode (one process doing both roles, for comparison with disaggregation)
the same step also carries chunks of prompts being prefilled into their reserved pages,
up to a token budget: the mixed batching of SGLang's and vLLM's chunked prefill.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch

from shared.grammar import GrammarBackend, SequenceGrammar, TokenMask, fill_masks
from shared.kv_pool import KVPoolExhausted
from shared.model.lora import LoraAdapter
from shared.model.lora_slots import AdapterBudget
from shared.model.runner import ModelRunner, SeqSlice
from shared.observability.request_id import request_log_extra
from shared.sampler import SamplingParams, TokenHistory, TopLogprobs, sample_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")


def _run_call(fn: Callable[[], Any], future: Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)


def _int32_bytes(rows: torch.Tensor) -> bytes:
    return rows.numpy().astype("<i4", copy=False).tobytes()


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, or the end of a sequence (token_id None on an error)."""

    token_id: int | None
    logprob: float
    finish_reason: str | None = None
    error: str | None = None
    top_logprobs: TopLogprobs | None = None  # when the request asked for alternatives
    # With return_routed_experts: int32 LE [1, layers, top_k], the experts of the token
    # this step computed (the sequence's previous one, not token_id).
    routed_experts: bytes = b""


@dataclass
class LocalPrefill:
    """A prompt computed by this engine into pages its submitter holds (colocated mode)."""

    request_id: str
    prompt: list[int]
    page_ids: list[int]
    params: SamplingParams
    # Called once, from the engine thread: the first token and logprob of each of the
    # params.n choices, or the error.
    done: Callable[[list[int], list[float], str | None], None]
    computed: int = 0
    lora: LoraAdapter | None = None
    # Set before `done` when params.top_logprobs: the first tokens' alternatives.
    first_token_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # A list to fill with each chunk's routed experts; None: not recorded (a preempted
    # sequence's recompute must not send its tokens' experts twice).
    routed_experts: list[torch.Tensor] | None = None


@dataclass
class DecodeSequence:
    request_id: str
    # Prompt and answer so far; the last token's KV is not computed yet.
    token_ids: list[int]
    page_ids: list[int]
    params: SamplingParams  # of this choice alone (n = 1)
    num_output: int  # answer tokens so far, the one sampled on prefill included
    emit: Callable[[TokenEvent], None]
    index: int = 0  # the request's choice this sequence samples (parallel sampling)
    finished: bool = field(default=False)
    lora: LoraAdapter | None = None
    grammar: SequenceGrammar | None = None  # structured output: its matcher, past token 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.request_id, self.index)


class DecodeEngine:
    def __init__(
        self,
        runner: ModelRunner,
        max_prefill_tokens: int = 512,
        chunked_prefill_size: int = 512,
    ) -> None:
        self.runner = runner
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked_prefill_size = chunked_prefill_size
        self._running: dict[tuple[str, int], DecodeSequence] = {}
        self._inbox: list[DecodeSequence] = []
        self._prefills: list[LocalPrefill] = []
        # Sequences that gave their pages up to others; they recompute their KV and resume.
        self._preempted: list[DecodeSequence] = []
        self._aborts: set[str] = set()
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []  # run_on_engine's
        # LoRA adapters whose rows sat out the last step (more adapters than slots): they
        # go first in the next one, so that no adapter waits for long.
        self._lora_waiting: set[int] = set()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self.grammars = GrammarBackend(runner.model_dir, runner.config.vocab_size)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        """False once the engine thread has died (its worker must not look healthy)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=10)

    def submit(self, seq: DecodeSequence) -> None:
        """Takes ownership of seq.page_ids: the engine frees them when seq ends."""
        with self._wakeup:
            self._inbox.append(seq)
            self._wakeup.notify()

    def submit_prefill(self, task: LocalPrefill) -> None:
        with self._wakeup:
            self._prefills.append(task)
            self._wakeup.notify()

    def run_on_engine(self, fn: Callable[[], T]) -> Future[T]:
        """Runs fn on the engine thread between two steps (it owns the model and the pool):
        embeddings on a colocated worker use it."""
        future: Future[T] = Future()
        with self._wakeup:
            self._calls.append((fn, future))
            self._wakeup.notify()
        return future

    def abort(self, request_id: str) -> None:
        """Ends a request's sequences at the next step boundary; a no-op for unknown ids."""
        with self._wakeup:
            self._aborts.add(request_id)
            self._wakeup.notify()

    def pages_owed(self) -> int:
        """Pages the admitted sequences may claim soon: one per running sequence for its
        next page, and the whole KV of each preempted one. New requests wait for these."""
        pool = self.runner.pool
        owed = sum(pool.pages_for(len(s.token_ids)) for s in list(self._preempted))
        return len(self._running) + owed

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (
                    self._stopping
                    or self._inbox
                    or self._aborts
                    or self._running
                    or self._prefills
                    or self._calls
                ):
                    if self._preempted:
                        # Nothing runs: pages can only come back from requests still
                        # waiting for their KV; look again shortly.
                        self._wakeup.wait(timeout=0.02)
                        break
                    self._wakeup.wait()
                if self._stopping:
                    break
                for seq in self._inbox:
                    self._running[seq.key] = seq
                self._inbox.clear()
                aborts, self._aborts = self._aborts, set()
                calls, self._calls = self._calls, []
            for fn, future in calls:
                _run_call(fn, future)
            if aborts:
                for seq in [*self._running.values(), *self._preempted]:
                    if seq.request_id in aborts:
                        self._finish(seq, TokenEvent(None, 0.0, "abort"))
            self._resume_preempted()
            with self._wakeup:
                prefills = list(self._prefills)
            for request_id in aborts:
                for task in [t for t in prefills if t.request_id == request_id]:
                    self._end_prefill(task, error="cancelled by the caller")
                    prefills.remove(task)
            if not (self._running or prefills):
                continue
            try:
                self._step(prefills)
            except Exception as exc:  # a failed step must not strand its sequences
                log.exception("decode step failed")
                for seq in list(self._running.values()):
                    self._finish(seq, TokenEvent(None, 0.0, None, f"decode step failed: {exc}"))
                for task in prefills:
                    self._end_prefill(task, error=f"prefill step failed: {exc}")
        for seq in list(self._running.values()) + self._inbox + self._preempted:
            self._finish(seq, TokenEvent(None, 0.0, None, "decode worker shutting down"))
        for task in list(self._prefills):
            self._end_prefill(task, error="worker shutting down")

    def _step(self, prefills: list[LocalPrefill]) -> None:
        pool = self.runner.pool
        batch: list[DecodeSequence] = []
        adapters = self._adapter_budget(prefills)
        waiting: set[int] = set()
        # Oldest first: when pages run out, the newest sequences give theirs up.
        for seq in list(self._running.values()):
            if seq.key not in self._running:
                continue  # preempted by an older sequence in this very loop
            if seq.lora is not None and adapters is not None and not adapters.admit(seq.lora):
                waiting.add(seq.lora.uid)
                continue
            position = len(seq.token_ids) - 1
            if pool.pages_for(position + 1) > len(seq.page_ids):
                page = self._claim_page(seq)
                if page is None:
                    continue
                seq.page_ids.append(page)
            batch.append(seq)
        slices = [
            SeqSlice(
                [s.token_ids[-1]],
                len(s.token_ids) - 1,
                s.page_ids,
                s.lora,
                record_routing=s.params.return_routed_experts,
            )
            for s in batch
        ]
        # Prompt chunks ride along in the same forward, within the step's token budget.
        chunks: list[tuple[LocalPrefill, int]] = []
        budget = self.max_prefill_tokens
        for task in prefills:
            if budget <= 0:
                break
            if task.lora is not None and adapters is not None and not adapters.admit(task.lora):
                waiting.add(task.lora.uid)
                continue
            take = min(len(task.prompt) - task.computed, self.chunked_prefill_size, budget)
            chunks.append((task, take))
            slices.append(
                SeqSlice(
                    task.prompt[task.computed : task.computed + take],
                    task.computed,
                    task.page_ids,
                    task.lora,
                    record_routing=task.routed_experts is not None,
                )
            )
            budget -= take
        self._lora_waiting = waiting
        if not slices:
            return
        logits = self.runner.forward(slices)
        routed = self.runner.routed_experts or [None] * len(slices)
        for (task, _), rows in zip(chunks, routed[len(batch) :], strict=True):
            if task.routed_experts is not None and rows is not None:
                task.routed_experts.append(rows)
        self._advance_prefills(chunks, logits[len(batch) :])
        if not batch:
            return
        token_ids, logprobs, top = sample_tokens(
            logits[: len(batch)],
            [s.params for s in batch],
            [s.num_output for s in batch],
            histories=[TokenHistory.split(s.token_ids, s.num_output) for s in batch],
            mask=fill_masks([s.grammar for s in batch], self.grammars.vocab_size),
        )
        max_context = self.runner.config.max_context
        for seq, token_id, logprob, alternatives, rows in zip(
            batch, token_ids, logprobs, top, routed[: len(batch)], strict=True
        ):
            seq.token_ids.append(token_id)
            seq.num_output += 1
            reason = None
            if seq.grammar is not None and not seq.grammar.accept(token_id):
                # The mask allowed it, so the matcher must: a bug, not the client's.
                self._finish(seq, TokenEvent(None, 0.0, None, "grammar rejected its own token"))
                continue
            if token_id in seq.params.stop_token_ids:
                reason = "stop"
            elif seq.grammar is not None and seq.grammar.terminated:
                reason = "stop"  # the grammar's end (its stop token, even under ignore_eos)
            elif seq.num_output >= seq.params.max_new_tokens or len(seq.token_ids) >= max_context:
                reason = "length"
            event = TokenEvent(
                token_id,
                logprob,
                reason,
                top_logprobs=alternatives if seq.params.top_logprobs else None,
                routed_experts=_int32_bytes(rows) if rows is not None else b"",
            )
            if reason is None:
                seq.emit(event)
            else:
                self._finish(seq, event)

    def _adapter_budget(self, prefills: list[LocalPrefill]) -> AdapterBudget | None:
        """The adapters this step may hold, those that waited last step taken first."""
        registry = self.runner.lora
        if registry is None:
            return None
        budget = registry.budget()
        items: list[DecodeSequence | LocalPrefill] = [*self._running.values(), *prefills]
        for item in items:
            if item.lora is not None and item.lora.uid in self._lora_waiting:
                budget.admit(item.lora)
        return budget

    def _claim_page(self, seq: DecodeSequence) -> int | None:
        """A page for seq's next token, preempting the newest sequences if need be.

        Returns None when seq itself was the newest and gave its pages up.
        """
        while True:
            try:
                return self.runner.pool.allocate(1)[0]
            except KVPoolExhausted:
                victim = next(reversed(self._running.values()))
                self._preempt(victim)
                if victim is seq:
                    return None

    def _preempt(self, seq: DecodeSequence) -> None:
        self._running.pop(seq.key, None)
        self.runner.pool.free(seq.page_ids)  # pages shared with its sibling choices stay theirs
        seq.page_ids = []
        self._preempted.append(seq)
        log.info(
            "request %s: preempted at %d tokens (KV pool full); will recompute",
            seq.request_id,
            len(seq.token_ids),
            extra=request_log_extra(seq.request_id),
        )

    def _resume_preempted(self) -> None:
        """Gives preempted sequences pages again, oldest first, and recomputes their KV."""
        pool = self.runner.pool
        while self._preempted:
            seq = self._preempted[0]
            needed = pool.pages_for(len(seq.token_ids))
            if self._running and pool.num_free - needed < len(self._running):
                return  # keep a page free for each running sequence's next token
            try:
                seq.page_ids = pool.allocate(needed)
            except KVPoolExhausted:
                return
            self._preempted.pop(0)
            # The KV of every token but the last, which the next decode step computes.
            recompute = LocalPrefill(
                seq.request_id,
                seq.token_ids[:-1],
                seq.page_ids,
                seq.params,
                done=partial(self._resumed, seq),
                lora=seq.lora,
            )
            with self._wakeup:
                self._prefills.append(recompute)

    def _resumed(
        self, seq: DecodeSequence, tokens: list[int], logprobs: list[float], error: str | None
    ) -> None:
        del tokens, logprobs  # the recompute's own sample is not part of the answer
        if error is None:
            self._running[seq.key] = seq
        elif error.startswith("cancelled"):
            self._finish(seq, TokenEvent(None, 0.0, "abort"))
        else:
            self._finish(seq, TokenEvent(None, 0.0, None, error))

    def _advance_prefills(
        self, chunks: list[tuple[LocalPrefill, int]], logits: torch.Tensor
    ) -> None:
        finished = []
        for row, (task, take) in enumerate(chunks):
            task.computed += take
            if task.computed == len(task.prompt):
                finished.append((row, task))
        if not finished:
            return
        # One row per choice: the n choices of a prompt sample from its last logits.
        rows = [row for row, task in finished for _ in range(task.params.n)]
        tokens, logprobs, top = sample_tokens(
            logits[rows],
            [task.params.for_choice(i) for _, task in finished for i in range(task.params.n)],
            [0] * len(rows),
            histories=[
                TokenHistory(task.prompt, ()) for _, task in finished for _ in range(task.params.n)
            ],
            mask=self._first_token_masks([task for _, task in finished]),
        )
        start = 0
        for _, task in finished:
            end = start + task.params.n
            if task.params.top_logprobs:
                task.first_token_top_logprobs = top[start:end]
            self._end_prefill(task, tokens[start:end], logprobs[start:end])
            start = end

    def _first_token_masks(self, tasks: list[LocalPrefill]) -> TokenMask | None:
        """Grammar masks at the start of the answer, one row per choice of each task."""
        grammars: list[SequenceGrammar | None] = []
        for task in tasks:
            spec = task.params.grammar
            grammar = None
            if spec is not None:
                grammar = self.grammars.matcher(spec, task.params.stop_token_ids)
            grammars += [grammar] * task.params.n
        return fill_masks(grammars, self.grammars.vocab_size)

    def _end_prefill(
        self,
        task: LocalPrefill,
        tokens: list[int] | None = None,
        logprobs: list[float] | None = None,
        error: str | None = None,
    ) -> None:
        with self._wakeup:
            if task not in self._prefills:
                return
            self._prefills.remove(task)
        task.done(tokens or [], logprobs or [], error)

    def _finish(self, seq: DecodeSequence, event: TokenEvent) -> None:
        if seq.finished:
            return
        seq.finished = True
        self._running.pop(seq.key, None)
        if seq in self._preempted:
            self._preempted.remove(seq)
        self.runner.pool.free(seq.page_ids)
        seq.page_ids = []
        seq.emit(event)
