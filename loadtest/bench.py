"""A whole run: warm up, measure every load point, write the results, print, plot."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
from tqdm import tqdm

from loadtest.client import EndpointConfig, fetch_model_id, stream_request
from loadtest.console import print_run
from loadtest.datasets import DatasetOptions, build_sessions
from loadtest.plots import write_plots
from loadtest.records import LoadPoint, RequestRecord, RunSummary
from loadtest.results import append_records, read_records, write_summary
from loadtest.runner import PointPlan, build_prompt, run_point
from loadtest.server_metrics import MetricsSampler
from loadtest.stats import summarise_point
from loadtest.tokens import TokenCounter, load_token_counter

log = logging.getLogger("kvrelay.bench")
WARMUP_SEED_OFFSET = 1_000_003  # warm-up prompts never repeat a measured one


@dataclass
class BenchOptions:
    endpoint: EndpointConfig
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    output_dir: Path = Path("bench-results")
    label: str = "run"
    tokenizer: str | None = None
    request_rates: list[float] = field(default_factory=lambda: [float("inf")])
    max_concurrencies: list[int | None] = field(default_factory=lambda: [None])
    burstiness: float = 1.0
    warmup_requests: int = 1
    duration_s: float | None = None
    drain_timeout_s: float = 60.0
    slo: dict[str, float] = field(default_factory=dict)
    server_metrics: bool = True
    metrics_interval_s: float = 1.0
    plots: bool = True
    plot_stat: str = "p50"
    progress: bool = True

    def load_points(self) -> list[LoadPoint]:
        return [LoadPoint(request_rate=rate, max_concurrency=conc, burstiness=self.burstiness)
                for rate in self.request_rates for conc in self.max_concurrencies]

    @property
    def sweep(self) -> Literal["request_rate", "concurrency"]:
        if len(self.max_concurrencies) > 1 and len(self.request_rates) == 1:
            return "concurrency"
        return "request_rate"


def _tick(bar: tqdm, _record: RequestRecord) -> None:
    bar.update()


async def _warm_up(client: httpx.AsyncClient, options: BenchOptions,
                   counter: TokenCounter) -> None:
    if options.warmup_requests <= 0:
        return
    warmup = dataclasses.replace(options.dataset, num_prompts=options.warmup_requests)
    sessions = build_sessions(warmup, counter, seed_offset=WARMUP_SEED_OFFSET)
    requests = [(session, turn) for session in sessions for turn in session.turns]
    # All at once: the pool then holds that many open connections, so the measured
    # requests do not pay TCP connects (and a threaded server's thread starts) in their TTFT.
    results = await asyncio.gather(*(
        stream_request(client, options.endpoint,
                       build_prompt(options.endpoint, session, [], turn), turn.output_len)
        for session, turn in requests
    ))
    for result in results:
        if not result.ok:
            log.warning("warm-up request failed: %s %s", result.error_type,
                        result.error_message)


async def run_benchmark_async(options: BenchOptions) -> RunSummary:
    endpoint = options.endpoint
    if not endpoint.model:
        model = await fetch_model_id(endpoint.base_url, endpoint.api_key)
        endpoint = options.endpoint = dataclasses.replace(endpoint, model=model)
    counter = load_token_counter(options.tokenizer, endpoint.model)
    out_dir = options.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    requests_path = out_dir / "requests.jsonl"
    requests_path.write_text("")
    summary = RunSummary(
        label=options.label, created=datetime.now(UTC).isoformat(timespec="seconds"),
        base_url=endpoint.base_url, model=endpoint.model, endpoint=endpoint.endpoint,
        dataset=options.dataset.describe(), tokenizer=counter.name,
        token_counts_exact=counter.exact, sweep=options.sweep,
        slo=options.slo, warmup_requests=options.warmup_requests, points=[],
    )
    # No pool limit: the arrival process and --max-concurrency decide what is in flight.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=endpoint.request_timeout_s) as client:
        await _warm_up(client, options, counter)
        for index, load in enumerate(options.load_points()):
            sessions = build_sessions(options.dataset, counter, seed_offset=index)
            plan = PointPlan(index, load, sessions, options.duration_s,
                             options.drain_timeout_s, seed=options.dataset.seed + index)
            sampler = MetricsSampler(client, endpoint.base_url, options.metrics_interval_s,
                                     endpoint.headers())
            if options.server_metrics:
                await sampler.start()
            bar = tqdm(total=plan.num_requests, desc=f"{options.label} {load.name}",
                       unit="req", disable=not options.progress)
            started = time.perf_counter()
            # Collect now and exempt every object made so far (torch, tokenizers, the
            # dataset) from later collections: a full pass over them stalls the event loop
            # for tens of ms, which the meter would book as server latency.
            gc.collect()
            gc.freeze()
            try:
                records = await run_point(client, endpoint, counter, plan,
                                          on_done=functools.partial(_tick, bar))
            finally:
                gc.unfreeze()
                bar.close()
            server = await sampler.stop()
            log.info("%s done in %.1f s", load.name, time.perf_counter() - started)
            append_records(requests_path, records)
            point = summarise_point(index, load, records, options.slo, server)
            point.host_load_avg = os.getloadavg()[0]
            summary.points.append(point)
    write_summary(out_dir, summary)
    return summary


def run_benchmark(options: BenchOptions) -> RunSummary:
    summary = asyncio.run(run_benchmark_async(options))
    print_run(summary)
    if options.plots:
        records = read_records(options.output_dir / summary.requests_file)
        write_plots([(summary, records)], options.output_dir, options.plot_stat)
    print(f"results in {options.output_dir}/ (summary.json, requests.jsonl"
          + (", *.png)" if options.plots else ")"))
    return summary
