"""The gateway's request metrics: counts by status, TTFT, TPOT, ITL, E2E, tokens, retries.

Each HTTP request gets a RequestObservation (shared/observability/http.py puts it in a
context variable); the generation reports its events to it with `observe_event`, from the
request's task or the tasks it starts, and the middleware records it when the response is
complete. The times run from the moment the request reached the gateway, as a client
would measure them: TTFT to the first generated text, ITL between text events, TPOT over
the rest of the answer, E2E to the last byte.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; from a cached short prompt on a GPU to long prompts on a loaded CPU.
# fmt: off
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                         0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
# fmt: on


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kvrelay_requests",
            "HTTP requests answered, by endpoint (route template) and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.running = Gauge(
            "kvrelay_gateway_running_requests",
            "Generation requests (completions, chat completions) in progress",
            registry=registry,
        )
        self.ttft = Histogram(
            "kvrelay_time_to_first_token_seconds",
            "From the request's arrival to its first generated text",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "kvrelay_time_per_output_token_seconds",
            "Per request: (E2E - TTFT) / (output tokens - 1), for answers of 2 tokens or more",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "kvrelay_inter_token_latency_seconds",
            "Gap between consecutive text events of one answer (a stop string may hold "
            "several tokens back into one event)",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "kvrelay_e2e_request_latency_seconds",
            "From a generation request's arrival to the last byte of its answer",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "kvrelay_gateway_prompt_tokens",
            "Prompt tokens of the generation requests that finished",
            registry=registry,
        )
        self.generation_tokens = Counter(
            "kvrelay_gateway_generation_tokens",
            "Output tokens of the generation requests that finished",
            registry=registry,
        )
        self.retries = Counter(
            "kvrelay_gateway_retries",
            "Requests sent again to another prefill/decode pair after a failure before any output",
            registry=registry,
        )

    def record(self, observation: RequestObservation, status: int) -> None:
        """One answered request, once its response is complete."""
        self.requests.labels(endpoint=observation.endpoint, status=str(status)).inc()
        if not observation.generation:
            return
        if observation.answers:  # finished answers only: failures would skew the times
            self.e2e.observe(time.perf_counter() - observation.arrived)
        if observation.first_text_at is not None:
            self.ttft.observe(observation.first_text_at - observation.arrived)
            per_answer = observation.completion_tokens / max(observation.answers, 1)
            if per_answer > 1 and observation.last_text_at is not None:
                decode_s = observation.last_text_at - observation.first_text_at
                self.tpot.observe(decode_s / (per_answer - 1))
        self.prompt_tokens.inc(observation.prompt_tokens)
        self.generation_tokens.inc(observation.completion_tokens)


@dataclass
class RequestObservation:
    endpoint: str
    generation: bool  # a completions endpoint: times and tokens are recorded
    metrics: RequestMetrics | None = None
    arrived: float = 0.0  # time.perf_counter()
    first_text_at: float | None = None
    last_text_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    answers: int = 0  # finished answers (choices)

    def on_event(self, event: object) -> None:
        """A generation event: text (has `text`) or an answer's end (has `completion_tokens`)."""
        now = time.perf_counter()
        if getattr(event, "text", None):
            if self.first_text_at is None:
                self.first_text_at = now
            elif self.last_text_at is not None and self.metrics is not None:
                self.metrics.itl.observe(now - self.last_text_at)
            self.last_text_at = now
        completion_tokens = getattr(event, "completion_tokens", None)
        if isinstance(completion_tokens, int):
            self.answers += 1
            self.completion_tokens += completion_tokens
            # n answers to one prompt share it: count its tokens once.
            self.prompt_tokens = max(self.prompt_tokens, int(getattr(event, "prompt_tokens", 0)))
            self.cached_tokens = max(self.cached_tokens, int(getattr(event, "cached_tokens", 0)))

    def on_retry(self) -> None:
        if self.metrics is not None:
            self.metrics.retries.inc()


_observation: ContextVar[RequestObservation | None] = ContextVar(
    "kvrelay_request_observation", default=None
)


def start_observation(observation: RequestObservation) -> None:
    observation.arrived = observation.arrived or time.perf_counter()
    _observation.set(observation)


def current_observation() -> RequestObservation | None:
    return _observation.get()


def observe_event(event: object) -> None:
    """Called by the generation for each event it yields (a no-op outside a request)."""
    observation = _observation.get()
    if observation is not None:
        observation.on_event(event)


def observe_retry() -> None:
    observation = _observation.get()
    if observation is not None:
        observation.on_retry()
