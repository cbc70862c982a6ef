"""Micro-benchmark of the Redis prefix index: lookup latency and announce throughput.

    python -m loadtest.bench_prefix_index [--workers 64] [--blocks 1000000] [--lookups 1000]

Starts a private redis-server, fills the index as `--workers` simulated prefill workers
would (hot system prompts held by many, the rest by one each) up to `--blocks` indexed
blocks, then times what a gateway does per request, a lookup of an 8k-token prompt
(512 blocks of 16), in several cases: one worker holds all of it, sixteen share its first
half, nobody holds it, every worker holds all of it. Writes summary.json and
lookup_latency.png to --output-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from services.redis_server import RedisServer
from shared.block_hash import block_hashes
from shared.prefix_index import (
    IndexKeys,
    IndexWriter,
    PrefixIndexPublisher,
    PrefixIndexReader,
    WorkerStatus,
)

BLOCK = 16
PROMPT_BLOCKS = 512  # an 8k-token prompt
MODEL = "bench-model"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def prompt_chain(seed: int, blocks: int = PROMPT_BLOCKS) -> list[bytes]:
    rng = random.Random(seed)
    return block_hashes([rng.randrange(49152) for _ in range(blocks * BLOCK)], BLOCK, model=MODEL)


def populate(writer: IndexWriter, num_workers: int, total_blocks: int, batch: int,
             lookup_prompts: dict[str, tuple[list[bytes], list[int], int]]) -> dict[str, Any]:
    """Registers the workers and announces blocks until the index holds total_blocks."""
    slots = [
        writer.heartbeat(WorkerStatus(f"worker-{i}", f"10.0.0.{i}:50051"), 3_600_000).slot
        for i in range(num_workers)
    ]
    indexed = 0
    announced = 0
    elapsed = 0.0
    # The prompts the lookups use: (hashes, holder workers, how many leading blocks each holds).
    for hashes, holders, depth in lookup_prompts.values():
        for worker in holders:
            writer.store(slots[worker], hashes[:depth])
        indexed += len(hashes[:depth])
    # Hot system prompts (2k tokens) held by a quarter of the workers each.
    for seed in range(8):
        hashes = prompt_chain(10_000 + seed, 128)
        for worker in random.Random(seed).sample(range(num_workers), max(1, num_workers // 4)):
            writer.store(slots[worker], hashes)
        indexed += len(hashes)
    # The rest: each worker's own prompts, announced in batches as prefill stores them.
    rng = random.Random(0)
    progress = tqdm(total=total_blocks, initial=indexed, desc="announcing", unit="blk",
                    unit_scale=True)
    while indexed < total_blocks:
        worker = rng.randrange(num_workers)
        count = min(batch, total_blocks - indexed)
        hashes = [rng.randbytes(16) for _ in range(count)]
        started = time.perf_counter()
        writer.store(slots[worker], hashes)
        elapsed += time.perf_counter() - started
        announced += count
        indexed += count
        progress.update(count)
    progress.close()
    return {"announce_blocks_per_s": announced / elapsed if elapsed else 0.0,
            "announce_batch_blocks": batch}


def publisher_throughput(url: str, prefix: str, blocks: int, batch: int) -> float:
    """Blocks per second through a real worker-side publisher (thread, batching, Redis)."""
    publisher = PrefixIndexPublisher(url, "publisher-bench", "127.0.0.1:1", key_prefix=prefix)
    publisher.set_snapshot(lambda: [])
    publisher.start()
    try:
        assert publisher.flush(30), "the publisher did not connect"
        rng = random.Random(1)
        hashes = [rng.randbytes(16) for _ in range(blocks)]
        started = time.perf_counter()
        for start in range(0, blocks, batch):
            publisher.blocks_stored(hashes[start : start + batch])
        assert publisher.flush(120), "the publisher did not finish"
        return blocks / (time.perf_counter() - started)
    finally:
        publisher.close()


async def time_calls(call: Callable[[Sequence[bytes]], Awaitable[Any]], hashes: list[bytes],
                     count: int, desc: str) -> list[float]:
    for _ in range(20):  # warm: connection, script cache
        await call(hashes)
    latencies = []
    for _ in tqdm(range(count), desc=desc, unit="lookup", leave=False):
        started = time.perf_counter()
        await call(hashes)
        latencies.append(time.perf_counter() - started)
    return latencies


async def time_lookups(url: str, prefix: str, cases: dict[str, tuple[list[bytes], list[int], int]],
                       count: int) -> dict[str, dict[str, Any]]:
    reader = PrefixIndexReader(url, key_prefix=prefix)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, (hashes, holders, depth) in cases.items():
            found = await reader.lookup(hashes)
            matched = sorted((d for d in found.values() if d), reverse=True)
            assert matched == [depth] * len(holders), (name, matched[:5])
            calls: list[tuple[str, Callable[[Sequence[bytes]], Awaitable[Any]]]] = [
                ("lookup", reader.lookup), ("lookup+status", reader.match)]
            for variant, call in calls:
                latencies = await time_calls(call, hashes, count, f"{name} {variant}")
                results[f"{name} ({variant})"] = {
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                    "mean_ms": statistics.fmean(latencies) * 1e3,
                    "latencies_ms": [x * 1e3 for x in latencies],
                }
    finally:
        await reader.close()
    return results


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for name, stats in results.items():
        values = sorted(stats["latencies_ms"])
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("lookup latency (ms, log scale)")
    ax.set_ylabel("fraction of lookups")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="indexed blocks in all")
    parser.add_argument("--lookups", type=int, default=1000, help="timed lookups per case")
    parser.add_argument("--announce-batch", type=int, default=512,
                        help="blocks per announcement (one 8k prompt)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results/prefix-index"))
    args = parser.parse_args(argv)

    everyone = list(range(args.workers))
    cases = {
        "1 worker holds all": (prompt_chain(1), [0], PROMPT_BLOCKS),
        "16 hold the first half": (prompt_chain(2), everyone[:16], PROMPT_BLOCKS // 2),
        "nobody holds it": (prompt_chain(3), [], 0),
        f"all {args.workers} hold all": (prompt_chain(4), everyone, PROMPT_BLOCKS),
    }
    console = Console()
    with tempfile.TemporaryDirectory(prefix="kvrelay-bench-redis-") as workdir:
        server = RedisServer(Path(workdir)).start()
        try:
            client = server.client()
            keys = IndexKeys("bench:")
            base_memory = int(client.info("memory")["used_memory"])
            fill = populate(IndexWriter(client, keys), args.workers, args.blocks,
                            args.announce_batch, cases)
            memory = int(client.info("memory")["used_memory"]) - base_memory
            block_keys = sum(1 for _ in client.scan_iter(match=b"bench:b:*", count=10_000))
            publisher_rate = publisher_throughput(server.url, "pub:", 200_000,
                                                  args.announce_batch)
            lookups = asyncio.run(time_lookups(server.url, keys.prefix, cases, args.lookups))
        finally:
            server.stop()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "workers": args.workers,
        "indexed_blocks": block_keys,
        "prompt_tokens": PROMPT_BLOCKS * BLOCK,
        "redis_memory_bytes": memory,
        "redis_bytes_per_block": memory / max(block_keys, 1),
        "announce_blocks_per_s_writer": fill["announce_blocks_per_s"],
        "announce_blocks_per_s_publisher": publisher_rate,
        "announce_batch_blocks": args.announce_batch,
        "cpu_count": os.cpu_count(),
        "lookups": {k: {s: v for s, v in r.items() if s != "latencies_ms"}
                    for k, r in lookups.items()},
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(lookups, args.output_dir / "lookup_latency.png",
         f"Prefix index lookup, 8k-token prompt, {args.workers} workers, "
         f"{block_keys / 1e6:.2f}M blocks")

    table = Table(title=f"prefix index: {args.workers} workers, {block_keys:,} blocks, "
                        f"{memory / 2**20:.0f} MiB in Redis")
    for column in ("8k-token lookup", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right" if column != "8k-token lookup" else "left")
    for name, stats in lookups.items():
        table.add_row(name, f"{stats['p50_ms']:.3f}", f"{stats['p99_ms']:.3f}",
                      f"{stats['mean_ms']:.3f}")
    console.print(table)
    console.print(
        f"announce: {fill['announce_blocks_per_s']:,.0f} blocks/s (writer, batches of "
        f"{args.announce_batch}); {publisher_rate:,.0f} blocks/s through the publisher thread"
    )
    console.print(f"results in {args.output_dir}/summary.json and lookup_latency.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
