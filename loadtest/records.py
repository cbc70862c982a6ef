"""What the load tester writes and reads back: one record per request, one summary per run.

Pydantic models, so that `kvrelay bench compare` validates the files it is given. Times
are in milliseconds everywhere in the files.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

# How the meter defines its timings; written into every summary so a reader knows.
TTFT_DEFINITION = (
    "TTFT: from just before the HTTP request is sent to the first SSE chunk whose "
    "choices[0] carries non-empty text (completions) or delta.content/reasoning_content "
    "(chat); role-only and usage-only chunks do not count. ITL: gaps between consecutive "
    "content chunks. TPOT = (E2E - TTFT) / (output tokens - 1). E2E: request sent to end "
    "of stream."
)

CountSource = Literal["usage", "tokenizer", "approx", "chunks"]


class RequestRecord(BaseModel):
    """One request as the client saw it (one line of requests.jsonl)."""

    point: int                       # index of the load point in the run
    request_index: int               # dispatch order within the point
    session_id: int                  # conversation (single-turn datasets: one per request)
    turn: int = 0
    group: int | None = None         # shared-prefix group
    source_id: str | None = None     # id of the item in a user-supplied dataset
    start_ms: float                  # when it was sent, from the start of the point
    ok: bool
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    requested_output_tokens: int
    prompt_tokens: int
    prompt_tokens_source: CountSource
    output_tokens: int = 0
    output_tokens_source: CountSource = "chunks"
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    tpot_ms: float | None = None      # None unless ok and output_tokens > 1
    itl_ms: list[float] = Field(default_factory=list)


class Distribution(BaseModel):
    """Mean, percentiles (numpy's linear interpolation) and max of one metric, in ms."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class LoadPoint(BaseModel):
    """One offered load: a request rate (inf: all at once) and/or a concurrency cap."""

    # JSON has no infinity: write "Infinity", which reads back as float("inf").
    model_config = ConfigDict(ser_json_inf_nan="strings")

    request_rate: float = math.inf
    max_concurrency: int | None = None
    burstiness: float = 1.0

    @property
    def name(self) -> str:
        parts = []
        if math.isfinite(self.request_rate) or self.max_concurrency is None:
            rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
            parts.append(f"rate={rate}")
        if self.max_concurrency is not None:
            parts.append(f"conc={self.max_concurrency}")
        return ",".join(parts)


class ServerFigures(BaseModel):
    """What the server's /metrics said about the point (None: not exported)."""

    available: bool = False
    prefix_hit_rate: float | None = None       # hit tokens / looked-up tokens, 0..1
    kv_usage_mean: float | None = None         # fraction of KV pool in use, 0..1
    kv_usage_max: float | None = None
    kv_transfer_bytes: float | None = None
    counters: dict[str, float] = Field(default_factory=dict)  # every counter's increase


class PointSummary(BaseModel):
    point: int
    load: LoadPoint
    num_requests: int
    completed: int
    failed: int
    errors: dict[str, int] = Field(default_factory=dict)
    duration_s: float
    request_throughput: float
    input_throughput: float           # prompt tokens of completed requests per s
    output_throughput: float
    total_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    goodput: float | None = None      # completed requests per s that met every SLO
    slo_attainment: float | None = None  # fraction of all requests that met every SLO
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    server: ServerFigures = Field(default_factory=ServerFigures)
    # This machine's 1-minute load average at the end of the point: when the server runs
    # here too, a figure above its core count means the numbers measured contention.
    host_load_avg: float | None = None


class RunSummary(BaseModel):
    """summary.json: one configuration measured at one or more load points."""

    schema_version: int = SCHEMA_VERSION
    label: str
    created: str
    base_url: str
    model: str
    endpoint: Literal["chat", "completions"]
    dataset: dict[str, str | int | float | bool | None]
    tokenizer: str
    token_counts_exact: bool
    sweep: Literal["request_rate", "concurrency"]
    slo: dict[str, float] = Field(default_factory=dict)
    warmup_requests: int
    ttft_definition: str = TTFT_DEFINITION
    requests_file: str = "requests.jsonl"
    points: list[PointSummary]
