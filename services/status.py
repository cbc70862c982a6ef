"""`kvrelay status`: every worker of the cluster at a glance.

Workers are found in Redis, where each announces its gRPC address and /metrics URL
(shared/observability/endpoints.py), and in `--metrics-urls`. For each: its gRPC health
check, its /metrics (running and queued requests, KV pages, prefix cache hit rate, memory)
and, for prefill workers, the prefix index's liveness entry (last heartbeat, queued tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass

import grpc
import grpc.aio
import httpx
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from shared.observability.endpoints import WorkerEndpoint, read_endpoints
from shared.prefix_index import PrefixIndexReader, PrefixIndexUnavailable
from shared.prefix_index.schema import WorkerStatus

TIMEOUT_S = 2.0


@dataclass
class WorkerRow:
    worker_id: str
    role: str = "?"
    address: str = ""  # gRPC host:port
    metrics_url: str = ""
    health: str = "unknown"  # serving, not serving, unreachable, unknown (no address)
    last_seen_s: float | None = None  # prefill: age of its prefix index heartbeat
    running: int | None = None
    queued: int | None = None
    queued_tokens: int | None = None  # prefill, from the prefix index
    kv_used_pages: int | None = None
    kv_total_pages: int | None = None
    kv_cached_pages: int | None = None
    hit_rate: float | None = None
    memory_bytes: float | None = None
    error: str = ""  # why a figure is missing

    @property
    def kv_usage(self) -> float | None:
        if self.kv_used_pages is None or not self.kv_total_pages:
            return None
        return self.kv_used_pages / self.kv_total_pages


Scraped = dict[str, float | dict[str, str]]


def parse_worker_metrics(text: str) -> Scraped:
    """Sample name -> value (the first series of each), plus "info" -> worker_info labels."""
    values: Scraped = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kvrelay_worker_info":
                values["info"] = dict(sample.labels)
            values.setdefault(sample.name, float(sample.value))
    return values


def _number(values: Scraped, name: str) -> float | None:
    value = values.get(name)
    return value if isinstance(value, float) else None


def _int(values: Scraped, name: str) -> int | None:
    value = _number(values, name)
    return None if value is None else int(value)


async def _scrape(client: httpx.AsyncClient, url: str) -> tuple[str, Scraped | str]:
    try:
        response = await client.get(url, timeout=TIMEOUT_S)
        response.raise_for_status()
        return url, parse_worker_metrics(response.text)
    except (httpx.HTTPError, ValueError) as exc:
        return url, f"/metrics: {type(exc).__name__}: {exc}"


async def _health(address: str) -> str:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
    except grpc.aio.AioRpcError:
        return "unreachable"
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return "serving" if serving else "not serving"


async def _live_prefill(redis_url: str) -> dict[str, WorkerStatus]:
    reader = PrefixIndexReader(redis_url, timeout_s=TIMEOUT_S)
    try:
        return await reader.live_workers()
    finally:
        await reader.close()


async def collect_status(
    endpoints: list[WorkerEndpoint],
    metrics_urls: list[str],
    redis_url: str | None = None,
) -> list[WorkerRow]:
    """One row per worker, from its announcement, its /metrics, its health check and the
    prefix index (whichever of these exist)."""
    rows: dict[str, WorkerRow] = {}
    for endpoint in endpoints:
        rows[endpoint.worker_id] = WorkerRow(
            endpoint.worker_id, endpoint.role, endpoint.grpc_address, endpoint.metrics_url
        )
    live: dict[str, WorkerStatus] = {}
    index_error = ""
    if redis_url:
        try:
            live = await _live_prefill(redis_url)
        except PrefixIndexUnavailable as exc:
            index_error = f"prefix index: {exc}"
    for worker_id, status in live.items():
        entry = rows.setdefault(worker_id, WorkerRow(worker_id, "prefill", status.address))
        entry.last_seen_s = max(time.time() - status.updated_at, 0.0)
        entry.queued_tokens = status.queued_tokens
        entry.kv_used_pages, entry.kv_total_pages = status.kv_used_pages, status.kv_total_pages
    urls = sorted({*metrics_urls, *(r.metrics_url for r in rows.values() if r.metrics_url)})
    async with httpx.AsyncClient() as client:
        scraped = await asyncio.gather(*(_scrape(client, url) for url in urls))
    by_url = {row.metrics_url: row for row in rows.values() if row.metrics_url}
    for url, values in scraped:
        if isinstance(values, str):
            failed = by_url.get(url) or rows.setdefault(url, WorkerRow(url, metrics_url=url))
            failed.error = values
            continue
        info = values.get("info")
        row = by_url.get(url)
        if row is None:
            worker_id = info.get("worker_id", url) if isinstance(info, dict) else url
            row = rows.setdefault(worker_id, WorkerRow(worker_id, metrics_url=url))
            row.metrics_url = url
        if isinstance(info, dict):
            row.role = info.get("role", row.role)
            row.address = row.address or info.get("address", "")
        row.running = _int(values, "kvrelay_worker_running_requests")
        row.queued = _int(values, "kvrelay_worker_queued_requests")
        row.kv_used_pages = _int(values, "kvrelay_worker_kv_pages_used")
        row.kv_total_pages = _int(values, "kvrelay_worker_kv_pages_total")
        row.kv_cached_pages = _int(values, "kvrelay_worker_kv_pages_cached")
        row.hit_rate = _number(values, "kvrelay_prefix_cache_hit_rate")
        row.memory_bytes = _number(values, "process_resident_memory_bytes")
    checked = [row for row in rows.values() if row.address]
    for row, health in zip(
        checked, await asyncio.gather(*(_health(r.address) for r in checked)), strict=True
    ):
        row.health = health
    if index_error:
        for row in rows.values():
            if row.role == "prefill":
                row.error = row.error or index_error
    return sorted(rows.values(), key=lambda r: (r.role, r.worker_id))


def _fmt(value: float | None, pattern: str = "{:.0f}") -> str:
    return "-" if value is None else pattern.format(value)


def render(rows: list[WorkerRow]) -> Table:
    table = Table(title=f"kvrelay: {len(rows)} workers", title_justify="left")
    for column in (
        "role",
        "worker",
        "address",
        "health",
        "running",
        "queued",
        "KV pages used",
        "cached",
        "hit rate",
        "memory",
        "index",
    ):
        table.add_column(column, no_wrap=column in ("worker", "address"))
    styles = {"serving": "green", "not serving": "yellow", "unreachable": "red"}
    for row in rows:
        kv = "-"
        if row.kv_used_pages is not None and row.kv_total_pages:
            kv = f"{row.kv_used_pages}/{row.kv_total_pages} ({row.kv_usage or 0:.0%})"
        index = "-"
        if row.last_seen_s is not None:
            index = f"seen {row.last_seen_s:.1f} s ago, {row.queued_tokens or 0} tokens queued"
        elif row.role == "prefill":
            index = row.error or "not in the index"
        style = styles.get(row.health, "")
        table.add_row(
            row.role,
            row.worker_id,
            row.address or "-",
            f"[{style}]{row.health}[/]" if style else row.health,
            _fmt(row.running),
            _fmt(row.queued),
            kv,
            _fmt(row.kv_cached_pages),
            _fmt(row.hit_rate, "{:.1%}"),
            _fmt(None if row.memory_bytes is None else row.memory_bytes / 2**20, "{:.0f} MiB"),
            index,
        )
    return table


def _split(urls: str) -> list[str]:
    return [u.strip() for u in urls.split(",") if u.strip()]


def _read_endpoints(redis_url: str) -> list[WorkerEndpoint]:
    client = redis.Redis.from_url(
        redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )
    try:
        return read_endpoints(client)
    finally:
        client.close()


def run_status(args: argparse.Namespace) -> int:
    """Prints the table (or JSON); exit status 1 when a worker is not serving or none is found."""
    console = Console()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per scrape otherwise
    metrics_urls = _split(args.metrics_urls)
    if not args.redis_url and not metrics_urls:
        console.print("kvrelay status needs --redis-url (or KVRELAY_REDIS_URL) or --metrics-urls")
        return 2
    while True:
        try:
            endpoints = _read_endpoints(args.redis_url) if args.redis_url else []
        except (redis.RedisError, OSError) as exc:
            console.print(f"[red]Redis at {args.redis_url}: {exc}[/]")
            endpoints = []
        rows = asyncio.run(collect_status(endpoints, metrics_urls, args.redis_url))
        if args.json:
            print(json.dumps([asdict(row) for row in rows], indent=2))
        else:
            if args.watch:
                console.clear()
            console.print(render(rows))
        if not args.watch:
            return 0 if rows and all(r.health == "serving" for r in rows) else 1
        time.sleep(args.watch)
