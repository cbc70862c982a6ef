"""Decode engine: continuous batching over the sequences whose KV has arrived.

One engine thread owns the model. Every step runs one batched forward over all
running sequences; sequences join and leave between steps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.kv_pool import KVPoolExhausted
from shared.model.runner import ModelRunner, SeqSlice
from shared.sampler import SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, or the end of a sequence (token_id None on an error)."""

    token_id: int | None
    logprob: float
    finish_reason: str | None = None
    error: str | None = None


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
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._running: dict[str, DecodeSequence] = {}
        self._inbox: list[DecodeSequence] = []
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

    def abort(self, request_id: str) -> None:
        """Ends a sequence at the next step boundary; a no-op for unknown ids."""
        with self._wakeup:
            self._aborts.add(request_id)
            self._wakeup.notify()

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._inbox or self._aborts or self._running):
                    self._wakeup.wait()
                if self._stopping:
                    break
                for seq in self._inbox:
                    self._running[seq.request_id] = seq
                self._inbox.clear()
                aborts, self._aborts = self._aborts, set()
            for request_id in aborts:
                aborted = self._running.get(request_id)
                if aborted is not None:
                    self._finish(aborted, TokenEvent(None, 0.0, "abort"))
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # a failed step must not strand its sequences
                    log.exception("decode step failed")
                    for seq in list(self._running.values()):
                        self._finish(seq, TokenEvent(None, 0.0, None, f"decode step failed: {exc}"))
        for seq in list(self._running.values()) + self._inbox:
            self._finish(seq, TokenEvent(None, 0.0, None, "decode worker shutting down"))

    def _step(self) -> None:
        pool = self.runner.pool
        batch: list[DecodeSequence] = []
        for seq in list(self._running.values()):
            position = len(seq.token_ids) - 1
            if pool.pages_for(position + 1) > len(seq.page_ids):
                try:
                    seq.page_ids.extend(pool.allocate(1))
                except KVPoolExhausted:
                    self._finish(seq, TokenEvent(None, 0.0, None, "decode KV pool exhausted"))
                    continue
            batch.append(seq)
        if not batch:
            return
        slices = [SeqSlice([s.token_ids[-1]], len(s.token_ids) - 1, s.page_ids) for s in batch]
        logits = self.runner.forward(slices)
        token_ids, logprobs = sample(
            logits, [s.params for s in batch], [s.num_output for s in batch]
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

    def _finish(self, seq: DecodeSequence, event: TokenEvent) -> None:
        if seq.finished:
            return
        seq.finished = True
        self._running.pop(seq.request_id, None)
        self.runner.pool.free(seq.page_ids)
        seq.page_ids = []
        seq.emit(event)
