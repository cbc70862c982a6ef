"""A worker's Prometheus metrics: one registry per process, served on `--metrics-port`.

Gauges of the KV pool and of the request queues are read when Prometheus scrapes (a
collector asks the worker, see `WorkerProbe`) rather than kept up to date on the hot path.
Counters and histograms are recorded where things happen: the services (per request), the
model runner (per forward step) and the KV transfer protocol (per chunk batch and request).
Code that runs without a worker (tests, tools) records into the same registry harmlessly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.kv_pool import KVPool
from shared.observability.request_id import seconds_since_call_started

# fmt: off
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# fmt: on
WORKER_LABELS = ("role", "worker_id")


@dataclass
class WorkerProbe:
    """What the collector asks a running worker at scrape time."""

    role: str
    worker_id: str
    model: str
    address: str  # gRPC host:port peers use
    pool: KVPool
    running: Callable[[], int]  # requests holding KV pages here
    queued: Callable[[], int]  # requests waiting for compute or for KV pages
    cached_pages: Callable[[], int] = lambda: 0  # pages only the prefix cache holds
    hit_rate: Callable[[], float] | None = None  # prefix cache: hit tokens / looked up


class _WorkerCollector(Collector):
    def __init__(self) -> None:
        self.probe: WorkerProbe | None = None

    def describe(self) -> Iterator[Metric]:
        # Names without values: lets the registry check for clashes before a probe exists.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        probe = self.probe
        if probe is None:
            return
        families = {family.name: family for family in self._families()}
        labels = [probe.role, probe.worker_id]
        pool = probe.pool
        used, total = pool.num_used, pool.num_pages
        families["kvrelay_worker_info"].add_metric(
            [*labels, probe.model, probe.address, str(pool.page_size)], 1
        )
        families["kvrelay_worker_kv_pages_total"].add_metric(labels, total)
        families["kvrelay_worker_kv_pages_used"].add_metric(labels, used)
        families["kvrelay_worker_kv_pages_free"].add_metric(labels, pool.num_free)
        families["kvrelay_worker_kv_pages_cached"].add_metric(labels, probe.cached_pages())
        families["kvrelay_worker_kv_page_bytes"].add_metric(labels, pool.page_bytes())
        families["kvrelay_kv_cache_usage_ratio"].add_metric(labels, used / total if total else 0)
        families["kvrelay_worker_running_requests"].add_metric(labels, probe.running())
        families["kvrelay_worker_queued_requests"].add_metric(labels, probe.queued())
        if probe.hit_rate is not None:
            families["kvrelay_prefix_cache_hit_rate"].add_metric(labels, probe.hit_rate())
        yield from families.values()

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        def gauge(name: str, documentation: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=[*WORKER_LABELS, *extra])

        return [
            gauge(
                "kvrelay_worker_info",
                "1 per worker: its model, address and KV page size",
                ("model", "address", "page_size"),
            ),
            gauge("kvrelay_worker_kv_pages_total", "KV pages of the worker's pool"),
            gauge("kvrelay_worker_kv_pages_used", "KV pages in use (prefix cache included)"),
            gauge("kvrelay_worker_kv_pages_free", "KV pages free"),
            gauge(
                "kvrelay_worker_kv_pages_cached",
                "KV pages only the prefix cache holds (evictable on demand)",
            ),
            gauge("kvrelay_worker_kv_page_bytes", "Bytes of one KV page (all layers, K and V)"),
            gauge("kvrelay_kv_cache_usage_ratio", "Fraction of the KV pool in use, 0 to 1"),
            gauge("kvrelay_worker_running_requests", "Requests holding KV pages on the worker"),
            gauge(
                "kvrelay_worker_queued_requests",
                "Requests waiting on the worker (for compute, or for KV pages)",
            ),
            gauge(
                "kvrelay_prefix_cache_hit_rate",
                "Prefill: prompt tokens found in the prefix cache / tokens looked up, "
                "since the worker started",
            ),
        ]


class TransferMetrics:
    """Both ends of the KV channel, by `side` (send: prefill, receive: decode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter(
            "kvrelay_kv_transfer_bytes", "KV bytes relayed", ["side"], registry=registry
        )
        self.pages = Counter(
            "kvrelay_kv_transfer_pages", "KV pages relayed", ["side"], registry=registry
        )
        self.seconds = Histogram(
            "kvrelay_kv_transfer_seconds",
            "send: handing one batch of pages to the transport; receive: first chunk of a "
            "request to its last (the prefill of later chunks included)",
            ["side"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "kvrelay_kv_transfer_failures",
            "KV transfers that failed: unreachable peer, bad or incomplete KV, or an abort",
            ["side", "reason"],
            registry=registry,
        )

    def sent(self, num_bytes: int, num_pages: int, seconds: float) -> None:
        self.bytes.labels(side="send").inc(num_bytes)
        self.pages.labels(side="send").inc(num_pages)
        self.seconds.labels(side="send").observe(seconds)

    def received(self, num_bytes: int, num_pages: int, seconds: float) -> None:
        self.bytes.labels(side="receive").inc(num_bytes)
        self.pages.labels(side="receive").inc(num_pages)
        self.seconds.labels(side="receive").observe(seconds)

    def failed(self, side: str, reason: str) -> None:
        self.failures.labels(side=side, reason=reason).inc()


class StepMetrics:
    """One engine's forward steps: time and batch size (sequences in one forward)."""

    def __init__(self, role: str, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            f"kvrelay_{role}_step_seconds",
            f"Time of one batched forward pass of the {role} engine",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"kvrelay_{role}_batch_size",
            f"Sequences in one forward pass of the {role} engine",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            f"kvrelay_{role}_step_tokens",
            f"Tokens computed by the {role} engine's forward passes",
            registry=registry,
        )

    def observe(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        self.seconds.observe(seconds)
        self.batch_size.observe(num_seqs)
        self.tokens.inc(num_tokens)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU seconds...
        GCCollector(registry=registry)
        self._collector = _WorkerCollector()
        registry.register(self._collector)
        self.transfer = TransferMetrics(registry)
        self.steps = {role: StepMetrics(role, registry) for role in ("prefill", "decode")}
        self.prefill_requests = Counter(
            "kvrelay_prefill_requests", "Prompts prefilled", registry=registry
        )
        self.prefill_prompt_tokens = Counter(
            "kvrelay_prefill_prompt_tokens",
            "Prompt tokens of the prompts prefilled",
            registry=registry,
        )
        self.prefill_cached_tokens = Counter(
            "kvrelay_prefill_cached_tokens",
            "Of those, the tokens found in the prefix cache (not computed)",
            registry=registry,
        )
        self.prefill_seconds = Histogram(
            "kvrelay_prefill_seconds",
            "Per prompt: from its first computed chunk to its first token",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.prefill_queue_seconds = Histogram(
            "kvrelay_prefill_queue_seconds",
            "Per prompt: time waiting in the prefill engine's line before its first chunk",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.decode_queue_seconds = Histogram(
            "kvrelay_decode_queue_seconds",
            "Per request: time waiting for the decode worker's KV pages",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.decode_generated_tokens = Counter(
            "kvrelay_decode_generated_tokens",
            "Tokens the decode engine sampled and streamed (the first token, sampled by "
            "prefill, not included)",
            registry=registry,
        )

    def bind(self, probe: WorkerProbe) -> None:
        """From now on, scrapes report this worker's gauges."""
        self._collector.probe = probe

    def decode_admitted(self) -> None:
        """The current decode call got its KV pages: its wait is its queue time."""
        waited = seconds_since_call_started()
        if waited is not None:
            self.decode_queue_seconds.observe(waited)

    def prefill_done(
        self, prompt_tokens: int, cached_tokens: int, queue_s: float, compute_s: float
    ) -> None:
        self.prefill_requests.inc()
        self.prefill_prompt_tokens.inc(prompt_tokens)
        self.prefill_cached_tokens.inc(cached_tokens)
        self.prefill_queue_seconds.observe(queue_s)
        self.prefill_seconds.observe(compute_s)


_process_metrics = WorkerMetrics()


def worker_metrics() -> WorkerMetrics:
    """This process's worker metrics (one registry per worker process)."""
    return _process_metrics
