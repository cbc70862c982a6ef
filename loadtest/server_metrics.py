"""Server-side figures from a Prometheus `/metrics` endpoint, when the server has one.

Counters are read before and after a load point (their increase is the point's share);
gauges are sampled every `interval_s` during it. Known names of kvrelay, vLLM and SGLang
are turned into the headline figures; every counter's increase is kept as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.records import ServerFigures

log = logging.getLogger("kvrelay.bench")

# (hit tokens, looked-up tokens) counter pairs: hit rate = increase of one / the other.
HIT_COUNTER_PAIRS = (
    ("kvrelay_prefix_cache_hit_tokens_total", "kvrelay_prefix_cache_query_tokens_total"),
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
)
HIT_RATE_GAUGES = ("sglang:cache_hit_rate",)
KV_USAGE_GAUGES = (  # fraction of the KV pool in use, 0..1
    "kvrelay_kv_cache_usage_ratio",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
)
TRANSFER_BYTES = re.compile(r"(kv_)?transfer.*bytes.*_total$|bytes_transferred")
SKIPPED_PREFIXES = ("python_", "process_")


@dataclass
class Scrape:
    counters: dict[str, float] = field(default_factory=dict)  # "name{labels}" -> value
    gauges: dict[str, list[float]] = field(default_factory=dict)  # name -> every series


def _series(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _is_cumulative(kind: str, sample_name: str) -> bool:
    """Counter samples, and the running sums and counts of histograms and summaries."""
    if kind in ("counter", "unknown", "untyped"):
        # Untyped *_total samples too: exporters disagree on where the TYPE line goes.
        return sample_name.endswith("_total")
    return kind in ("histogram", "summary") and sample_name.endswith(("_sum", "_count"))


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    gauges: dict[str, list[float]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        if family.name.startswith(SKIPPED_PREFIXES):
            continue
        for sample in family.samples:
            if family.type == "gauge":
                gauges[sample.name].append(float(sample.value))
            elif _is_cumulative(family.type, sample.name):
                scrape.counters[_series(sample.name, sample.labels)] = float(sample.value)
    scrape.gauges = dict(gauges)
    return scrape


def _increase(before: Scrape, after: Scrape, name: str) -> float | None:
    """Increase of every series of counter `name` (summed over labels), None if absent."""
    keys = [k for k in after.counters if k == name or k.startswith(name + "{")]
    if not keys:
        return None
    return sum(after.counters[k] - before.counters.get(k, 0.0) for k in keys)


def figures(before: Scrape, after: Scrape, gauge_samples: list[Scrape]) -> ServerFigures:
    out = ServerFigures(available=True)
    out.counters = {
        key: value - before.counters.get(key, 0.0)
        for key, value in sorted(after.counters.items())
        if value - before.counters.get(key, 0.0) != 0
    }
    for hits_name, queries_name in HIT_COUNTER_PAIRS:
        hits, queries = _increase(before, after, hits_name), _increase(before, after, queries_name)
        if hits is not None and queries:
            out.prefix_hit_rate = hits / queries
            break
    for name in HIT_RATE_GAUGES:
        # A server that keeps its own running hit rate (SGLang): its value at the end.
        values = after.gauges.get(name)
        if out.prefix_hit_rate is None and values:
            out.prefix_hit_rate = sum(values) / len(values)
    for name in KV_USAGE_GAUGES:
        per_scrape = [s.gauges[name] for s in gauge_samples if s.gauges.get(name)]
        if per_scrape:
            out.kv_usage_mean = sum(sum(v) / len(v) for v in per_scrape) / len(per_scrape)
            out.kv_usage_max = max(max(v) for v in per_scrape)
            break
    transfer = [v for k, v in out.counters.items() if TRANSFER_BYTES.search(k.split("{")[0])]
    if transfer:
        out.kv_transfer_bytes = sum(transfer)
    return out


class MetricsSampler:
    """Scrapes `base_url/metrics` around and during one load point."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, interval_s: float,
                 headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + "/metrics"
        self.interval_s = interval_s
        self.headers = headers or {}
        self._before: Scrape | None = None
        self._samples: list[Scrape] = []
        self._task: asyncio.Task[None] | None = None

    async def scrape(self) -> Scrape | None:
        try:
            response = await self.client.get(self.url, headers=self.headers, timeout=5.0)
            if response.status_code != 200:
                return None
            return parse_metrics(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("no server metrics from %s: %s", self.url, exc)
            return None

    async def start(self) -> None:
        self._before = await self.scrape()
        if self._before is not None:
            self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            scrape = await self.scrape()
            if scrape is not None:
                self._samples.append(scrape)

    async def stop(self) -> ServerFigures:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._before is None:
            return ServerFigures()
        after = await self.scrape()
        if after is None:
            return ServerFigures()
        return figures(self._before, after, [*self._samples, after])
