"""Soak: many requests with random faults injected; memory and KV accounting must stay flat.

    python -m loadtest.soak --requests 10000 --concurrency 8 [--model-path DIR]
        [--prefill 2 --decode 2] [--fault-gap-s 1 4] [--seed 1] [--json OUT]

Starts its own cluster (gateway and workers as separate processes, each worker with its
/metrics), then sends `--requests` completions, `--concurrency` at a time. Faults, seeded:
a share of the requests are streams that the client drops after a few events, and every
few seconds (`--fault-gap-s`) one worker is hung for a moment (SIGSTOP, then SIGCONT) or
killed (SIGKILL) and restarted. At the start and the end it records every process's
resident memory and every worker's KV pool; at the end no page may be held once the
cluster is idle, and no request may have failed otherwise than by an injected fault.

Run from a checkout (it starts the cluster with the test suite's tests/cluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tests.cluster import Cluster

REQUEST_TIMEOUT_S = 60.0  # a request still open after this counts as hung
SETTLE_S = 20.0  # after the last request, how long the pools get to go idle
RSS = "process_resident_memory_bytes"


@dataclass(frozen=True)
class SoakSettings:
    requests: int = 10_000
    concurrency: int = 8
    max_tokens: int = 8
    disconnect_share: float = 0.1  # streams the client drops after a few events
    fault_gap_s: tuple[float, float] = (1.0, 4.0)  # between two worker faults (0, 0: none)
    hang_s: tuple[float, float] = (0.5, 2.5)  # SIGSTOP for a random time in this range
    kill_share: float = 0.3  # of the worker faults, kills (the rest: hangs)
    seed: int = 1


@dataclass
class SoakReport:
    requests: int
    seconds: float
    outcomes: dict[str, int]  # ok, dropped_by_client, unavailable (503 or SSE error), failed
    faults: dict[str, int]  # hang, kill
    rss_start: dict[str, int]  # process name -> bytes
    rss_end: dict[str, int]
    pages_start: dict[str, tuple[int, int]]  # worker -> (held, total)
    pages_end: dict[str, tuple[int, int]]
    failures: list[str] = field(default_factory=list)  # the first few unexpected answers

    @property
    def pages_leaked(self) -> int:
        return sum(held for held, _ in self.pages_end.values())

    def rss_growth(self, name: str) -> int:
        return self.rss_end.get(name, 0) - self.rss_start.get(name, 0)

    def text(self) -> str:
        lines = [
            f"{self.requests} requests in {self.seconds:.0f} s "
            f"({self.requests / max(self.seconds, 1e-9):.1f}/s)",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())),
            "RSS (MiB) start -> end:",
        ]
        for name in sorted(self.rss_end):
            start = self.rss_start.get(name, 0) / 2**20
            lines.append(f"  {name:10s} {start:8.1f} -> {self.rss_end[name] / 2**20:8.1f}")
        lines.append("KV pages held/total, start -> end:")
        for name in sorted(self.pages_end):
            held0, total0 = self.pages_start.get(name, (0, 0))
            held1, total1 = self.pages_end[name]
            lines.append(f"  {name:10s} {held0}/{total0} -> {held1}/{total1}")
        lines.append(f"pages leaked: {self.pages_leaked}")
        return "\n".join(lines)


def _scrape(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def _workers(cluster: Cluster) -> list[tuple[str, str]]:
    """(name, role) of every worker."""
    return [(f"prefill-{i}", "prefill") for i in range(len(cluster.prefill_addrs))] + [
        (f"decode-{i}", "decode") for i in range(len(cluster.decode_addrs))
    ]


def _memory(cluster: Cluster) -> dict[str, int]:
    rss = {"gateway": int(_scrape(f"{cluster.base_url}/metrics", RSS))}
    for name, _ in _workers(cluster):
        rss[name] = int(_scrape(cluster.metrics_urls[name], RSS))
    return rss


def _pages(cluster: Cluster) -> dict[str, tuple[int, int]]:
    pages = {}
    for name, role in _workers(cluster):
        info = cluster.worker_info(cluster.address(name), role)
        pages[name] = (info.num_pages - info.free_pages - info.cached_pages, info.num_pages)
    return pages


class _Soak:
    def __init__(self, cluster: Cluster, settings: SoakSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.rng = random.Random(settings.seed)
        # Faults draw from their own generator: the same faults in the same order whatever
        # the timing of the requests.
        self.fault_rng = random.Random(settings.seed + 1)
        self.outcomes: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.failures: list[str] = []
        self.done = 0
        self._restarts: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(self.settings.requests):
            queue.put_nowait(index)
        limits = httpx.Limits(max_connections=self.settings.concurrency * 2)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

            async def sender() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    outcome = await self._one(client, index)
                    self.outcomes[outcome] += 1
                    self.done += 1

            injector = asyncio.ensure_future(self._inject())
            try:
                await asyncio.gather(*(sender() for _ in range(self.settings.concurrency)))
            finally:
                injector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await injector
                for restart in list(self._restarts.values()):
                    await restart

    async def _one(self, client: httpx.AsyncClient, index: int) -> str:
        settings = self.settings
        drop_after = None
        if self.rng.random() < settings.disconnect_share:
            drop_after = self.rng.randint(1, 4)
        body = {
            "model": self.cluster.model_name,
            "prompt": f"soak {index} {uuid.uuid4().hex[:8]} " + "word " * self.rng.randint(4, 60),
            "max_tokens": settings.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": drop_after is not None or self.rng.random() < 0.3,
        }
        url = f"{self.cluster.base_url}/v1/completions"
        try:
            if not body["stream"]:
                response = await client.post(url, json=body)
                return self._judge(response.status_code, response.text, streamed=False)
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    return self._judge(response.status_code, await response.aread(), False)
                events: list[str] = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if drop_after is not None and len(events) >= drop_after:
                            return "dropped_by_client"  # leaving the block hangs up
                return self._judge(200, "\n".join(events), streamed=True)
        except httpx.TimeoutException:
            self._failed(f"request {index}: no answer within {REQUEST_TIMEOUT_S} s")
            return "failed"
        except httpx.HTTPError as exc:
            self._failed(f"request {index}: {type(exc).__name__}: {exc}")
            return "failed"

    def _judge(self, status: int, text: str | bytes, streamed: bool) -> str:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if status == 503:
            return "unavailable"  # a fault's doing: no pair could take it then
        if status != 200:
            self._failed(f"HTTP {status}: {text[:300]}")
            return "failed"
        if streamed:
            events = text.splitlines()
            if not events or events[-1] != "[DONE]":
                self._failed(f"stream without [DONE]: {text[-300:]}")
                return "failed"
            if any('"error"' in e for e in events):
                return "unavailable"  # ended by a fault mid-stream, with an error event
            return "ok"
        usage = json.loads(text).get("usage", {})
        if usage.get("completion_tokens") != self.settings.max_tokens:
            self._failed(f"short answer: {text[:300]}")
            return "failed"
        return "ok"

    def _failed(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)

    async def _inject(self) -> None:
        """Worker faults at random times until the requests are done: a hang (SIGSTOP for
        a while, then SIGCONT), or a kill (SIGKILL, restarted meanwhile; one at a time)."""
        low, high = self.settings.fault_gap_s
        if high <= 0:
            return
        rng = self.fault_rng
        while True:
            await asyncio.sleep(rng.uniform(low, high))
            name = rng.choice([n for n, _ in _workers(self.cluster)])
            kill = rng.random() < self.settings.kill_share
            hang_s = rng.uniform(*self.settings.hang_s)
            if name in self._restarts:
                continue  # still coming back from its kill
            if kill and not self._restarts:  # one worker down at a time
                self.faults["kill"] += 1
                os.kill(self.cluster.process(name).pid, signal.SIGKILL)
                self._restarts[name] = asyncio.ensure_future(self._restart(name))
                continue
            self.faults["hang"] += 1
            pid = self.cluster.process(name).pid
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(hang_s)
            finally:
                os.kill(pid, signal.SIGCONT)

    async def _restart(self, name: str) -> None:
        await asyncio.sleep(0.5)
        try:
            await asyncio.to_thread(self.cluster.restart, name)
        finally:
            del self._restarts[name]


def run_soak(cluster: Cluster, settings: SoakSettings) -> SoakReport:
    """Soaks a running cluster whose workers serve /metrics (start_cluster(metrics=True))."""
    cluster.wait_all_pages_free(timeout_s=SETTLE_S)
    pages_start = _pages(cluster)
    rss_start = _memory(cluster)
    soak = _Soak(cluster, settings)
    started = time.monotonic()
    asyncio.run(soak.run())
    seconds = time.monotonic() - started
    try:
        cluster.wait_all_pages_free(timeout_s=SETTLE_S)
    except AssertionError as exc:
        soak.failures.append(str(exc))
    return SoakReport(
        requests=settings.requests,
        seconds=seconds,
        outcomes=dict(soak.outcomes),
        faults=dict(soak.faults),
        rss_start=rss_start,
        rss_end=_memory(cluster),
        pages_start=pages_start,
        pages_end=_pages(cluster),
        failures=soak.failures,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--kv-cache-mb", type=int, default=64)
    parser.add_argument("--requests", type=int, default=SoakSettings.requests)
    parser.add_argument("--concurrency", type=int, default=SoakSettings.concurrency)
    parser.add_argument("--max-tokens", type=int, default=SoakSettings.max_tokens)
    parser.add_argument(
        "--fault-gap-s",
        type=float,
        nargs=2,
        default=SoakSettings.fault_gap_s,
        metavar=("MIN", "MAX"),
        help="seconds between two worker faults",
    )
    parser.add_argument("--seed", type=int, default=SoakSettings.seed)
    parser.add_argument("--log-dir", type=Path, default=Path("soak-logs"))
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    try:
        from shared.model.loader import resolve_model_dir
        from tests.cluster import start_cluster
    except ImportError:
        print("run the soak from a kvrelay checkout (it needs tests/cluster.py)", file=sys.stderr)
        return 2
    model_dir = resolve_model_dir(str(args.model_path) if args.model_path else None)
    cluster = start_cluster(
        model_dir,
        args.log_dir,
        num_prefill=args.prefill,
        num_decode=args.decode,
        kv_cache_mb=args.kv_cache_mb,
        metrics=True,
        worker_args=["--num-threads", "1"],
    )
    try:
        settings = SoakSettings(
            requests=args.requests,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            fault_gap_s=tuple(args.fault_gap_s),
            seed=args.seed,
        )
        report = run_soak(cluster, settings)
    finally:
        cluster.stop()
    print(report.text())
    for failure in report.failures:
        print(f"unexpected: {failure}")
    if args.json is not None:
        data: dict[str, Any] = asdict(report)
        data["pages_leaked"] = report.pages_leaked
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if report.pages_leaked == 0 and not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
