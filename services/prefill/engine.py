"""Prefill engine: computes a prompt, samples its first token, relays its KV to decode.

Runs on a single engine thread; the gRPC service hands it jobs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shared.model.runner import ModelRunner, SeqSlice
from shared.sampler import SamplingParams, sample
from shared.transfer import KvSender, KvTransferError

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    first_token_logprob: float
    kv_bytes_sent: int
    compute_s: float
    transfer_s: float


class PrefillEngine:
    def __init__(self, runner: ModelRunner, sender: KvSender) -> None:
        self.runner = runner
        self.sender = sender

    def run(self, job: PrefillJob) -> PrefillOutcome:
        pool = self.runner.pool
        if not job.prompt:
            raise ValueError("empty prompt")
        if len(job.prompt) >= self.runner.config.max_context:
            raise ValueError(
                f"prompt of {len(job.prompt)} tokens exceeds the context of "
                f"{self.runner.config.max_context}"
            )
        if job.destination is not None and len(job.destination.page_ids) != pool.pages_for(
            len(job.prompt)
        ):
            raise ValueError("reserved decode pages do not fit the prompt")
        pages = pool.allocate(pool.pages_for(len(job.prompt)))
        try:
            return self._compute_and_send(job, pages)
        except Exception as exc:
            if job.destination is not None and not isinstance(exc, KvTransferError):
                # Decode frees its reserved pages now instead of waiting for its timeout.
                self._abort_quietly(job, f"prefill failed: {exc}")
            raise
        finally:
            pool.free(pages)

    def _compute_and_send(self, job: PrefillJob, pages: list[int]) -> PrefillOutcome:
        started = time.perf_counter()
        logits = self.runner.forward([SeqSlice(job.prompt, 0, pages)])
        token_ids, logprobs = sample(logits, [job.params], [0])
        computed = time.perf_counter()
        sent = 0
        if job.destination is not None:
            sent = self.sender.send(
                request_id=job.request_id,
                endpoint=job.destination.endpoint,
                dst_page_ids=job.destination.page_ids,
                pool=self.runner.pool,
                src_page_ids=pages,
                num_tokens=len(job.prompt),
                first_token_id=token_ids[0],
                first_token_logprob=logprobs[0],
            )
        finished = time.perf_counter()
        log.info(
            "request %s: prefill %d tokens in %.1f ms, KV %d bytes in %.1f ms",
            job.request_id,
            len(job.prompt),
            (computed - started) * 1e3,
            sent,
            (finished - computed) * 1e3,
        )
        return PrefillOutcome(
            token_ids[0], logprobs[0], sent, computed - started, finished - computed
        )

    def _abort_quietly(self, job: PrefillJob, reason: str) -> None:
        assert job.destination is not None
        try:
            self.sender.abort(
                request_id=job.request_id, endpoint=job.destination.endpoint, reason=reason
            )
        except KvTransferError:
            log.warning("request %s: could not tell decode about the abort", job.request_id)
