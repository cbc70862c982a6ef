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
from dataclasses import dataclass, field
from functools import partial

import torch

from shared.kv_pool import KVPoolExhausted
from shared.model.runner import ModelRunner, SeqSlice
from shared.sampler import SamplingParams, TokenHistory, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, or the end of a sequence (token_id None on an error)."""

    token_id: int | None
    logprob: float
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class LocalPrefill:
    """A prompt computed by this engine into pages its submitter holds (colocated mode)."""

    request_id: str
    prompt: list[int]
    page_ids: list[int]
    params: SamplingParams
    # Called once, from the engine thread: (first token, logprob) or the error.
    done: Callable[[int, float, str | None], None]
    computed: int = 0


@dataclass
class DecodeSequence:
    request_id: str
    # Prompt and answer so far; the last token's KV is not computed yet.
    token_ids: list[int]
    page_ids: list[int]
    params: SamplingParams
    num_output: int  # answer tokens so far, the one sampled on prefill included
    emit: Callable[[TokenEvent], None]
    finished: bool = field(default=False)


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
        self._running: dict[str, DecodeSequence] = {}
        self._inbox: list[DecodeSequence] = []
        self._prefills: list[LocalPrefill] = []
        # Sequences that gave their pages up to others; they recompute their KV and resume.
        self._preempted: list[DecodeSequence] = []
        self._aborts: set[str] = set()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

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

    def abort(self, request_id: str) -> None:
        """Ends a sequence at the next step boundary; a no-op for unknown ids."""
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
                    self._stopping or self._inbox or self._aborts or self._running or self._prefills
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
                    self._running[seq.request_id] = seq
                self._inbox.clear()
                aborts, self._aborts = self._aborts, set()
            for request_id in aborts:
                aborted = self._running.get(request_id)
                aborted = aborted or next(
                    (s for s in self._preempted if s.request_id == request_id), None
                )
                if aborted is not None:
                    self._finish(aborted, TokenEvent(None, 0.0, "abort"))
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
        # Oldest first: when pages run out, the newest sequences give theirs up.
        for seq in list(self._running.values()):
            if seq.request_id not in self._running:
                continue  # preempted by an older sequence in this very loop
            position = len(seq.token_ids) - 1
            if pool.pages_for(position + 1) > len(seq.page_ids):
                page = self._claim_page(seq)
                if page is None:
                    continue
                seq.page_ids.append(page)
            batch.append(seq)
        slices = [SeqSlice([s.token_ids[-1]], len(s.token_ids) - 1, s.page_ids) for s in batch]
        # Prompt chunks ride along in the same forward, within the step's token budget.
        chunks: list[tuple[LocalPrefill, int]] = []
        budget = self.max_prefill_tokens
        for task in prefills:
            if budget <= 0:
                break
            take = min(len(task.prompt) - task.computed, self.chunked_prefill_size, budget)
            chunks.append((task, take))
            slices.append(
                SeqSlice(
                    task.prompt[task.computed : task.computed + take], task.computed, task.page_ids
                )
            )
            budget -= take
        if not slices:
            return
        logits = self.runner.forward(slices)
        self._advance_prefills(chunks, logits[len(batch) :])
        if not batch:
            return
        token_ids, logprobs = sample(
            logits[: len(batch)],
            [s.params for s in batch],
            [s.num_output for s in batch],
            histories=[TokenHistory.split(s.token_ids, s.num_output) for s in batch],
        )
        max_context = self.runner.config.max_context
        for seq, token_id, logprob in zip(batch, token_ids, logprobs, strict=True):
            seq.token_ids.append(token_id)
            seq.num_output += 1
            reason = None
            if token_id in seq.params.stop_token_ids:
                reason = "stop"
            elif seq.num_output >= seq.params.max_new_tokens or len(seq.token_ids) >= max_context:
                reason = "length"
            event = TokenEvent(token_id, logprob, reason)
            if reason is None:
                seq.emit(event)
            else:
                self._finish(seq, event)

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
        self._running.pop(seq.request_id, None)
        self.runner.pool.free(seq.page_ids)
        seq.page_ids = []
        self._preempted.append(seq)
        log.info(
            "request %s: preempted at %d tokens (KV pool full); will recompute",
            seq.request_id,
            len(seq.token_ids),
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
            )
            with self._wakeup:
                self._prefills.append(recompute)

    def _resumed(self, seq: DecodeSequence, token: int, logprob: float, error: str | None) -> None:
        del token, logprob  # the recompute's own sample is not part of the answer
        if error is None:
            self._running[seq.request_id] = seq
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
        tokens, logprobs = sample(
            logits[[row for row, _ in finished]],
            [task.params for _, task in finished],
            [0] * len(finished),
            histories=[TokenHistory(task.prompt, ()) for _, task in finished],
        )
        for (_, task), token, logprob in zip(finished, tokens, logprobs, strict=True):
            self._end_prefill(task, token, logprob)

    def _end_prefill(
        self, task: LocalPrefill, token: int = -1, logprob: float = 0.0, error: str | None = None
    ) -> None:
        with self._wakeup:
            if task not in self._prefills:
                return
            self._prefills.remove(task)
        task.done(token, logprob, error)

    def _finish(self, seq: DecodeSequence, event: TokenEvent) -> None:
        if seq.finished:
            return
        seq.finished = True
        self._running.pop(seq.request_id, None)
        if seq in self._preempted:
            self._preempted.remove(seq)
        self.runner.pool.free(seq.page_ids)
        seq.page_ids = []
        seq.emit(event)
