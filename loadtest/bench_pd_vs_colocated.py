"""TPOT under prefill interference: disaggregated (PD) against colocated, in one run.

    python -m loadtest.bench_pd_vs_colocated [--duration-s 30] [--streams 8]
                                             [--long-prompt-tokens 2048] [--interval-s 1]

Each configuration gets the same load for --duration-s: --streams clients that keep a
streaming chat request open (re-issued as each ends), while a --long-prompt-tokens prompt
arrives every --interval-s. PD runs the prefill and the decode worker as processes pinned
to one core each (taskset, one torch thread each); colocated runs one process with both
cores that mixes prompt chunks into its decode steps. We report the streams' TPOT and
inter-token latency percentiles: decode steps that wait behind prefill work show up there.
Prints a table, writes JSON and a PNG of the ITL distributions (--out-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from services.processes import ChildProcess, free_port, grpc_serving, http_healthy
from shared.model.loader import resolve_model_dir

MODEL_NAME = "bench-model"


@dataclass
class Measurements:
    tpot_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    long_ttft_s: list[float] = field(default_factory=list)
    streams_done: int = 0
    long_done: int = 0
    errors: int = 0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_configuration(
    mode: str, model_dir: Path, workdir: Path, chunk: int, processes: list[ChildProcess]
) -> str:
    """Starts the workers and a gateway into `processes` (the caller stops them, also when a
    start fails); returns the gateway's base URL."""
    common = [
        "--model-path",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--kv-cache-mb",
        "1024",
        "--max-prefill-tokens",
        str(chunk),
        "--chunked-prefill-size",
        str(chunk),
        "--log-level",
        "warning",
    ]
    taskset = shutil.which("taskset")
    if mode == "pd":
        prefill_port, decode_port = free_port(), free_port()
        pin = (lambda core: [taskset, "-c", str(core)]) if taskset else (lambda core: [])
        for name, core, role, port in (
            ("prefill", 0, "prefill", prefill_port),
            ("decode", 1, "decode", decode_port),
        ):
            argv = [
                *pin(core),
                sys.executable,
                "-m",
                "services.cli",
                role,
                "--port",
                str(port),
                "--num-threads",
                "1",
                *common,
            ]
            processes.append(ChildProcess(name, argv, log_path=workdir / f"{name}.log").start())
        prefill_addr, decode_addr = f"127.0.0.1:{prefill_port}", f"127.0.0.1:{decode_port}"
    else:
        port = free_port()
        processes.append(
            ChildProcess.kvrelay(
                "colocated",
                ["decode", "--colocated", "--port", str(port), "--num-threads", "2", *common],
                log_path=workdir / "colocated.log",
            ).start()
        )
        prefill_addr = decode_addr = f"127.0.0.1:{port}"
    for process, address in zip(processes, [prefill_addr, decode_addr], strict=False):
        process.wait_ready(partial(grpc_serving, address), timeout_s=300)
    gateway_port = free_port()
    gateway = ChildProcess.kvrelay(
        "gateway",
        [
            "gateway",
            "--port",
            str(gateway_port),
            "--model-path",
            str(model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--prefill-addrs",
            prefill_addr,
            "--decode-addrs",
            decode_addr,
            "--log-level",
            "warning",
            "--router-policy",
            "round_robin",
        ],
        log_path=workdir / "gateway.log",
    ).start()
    processes.append(gateway)
    base_url = f"http://127.0.0.1:{gateway_port}"
    gateway.wait_ready(lambda: http_healthy(f"{base_url}/health"), timeout_s=120)
    return base_url


async def _stream_client(
    client: httpx.AsyncClient, base_url: str, deadline: float, out: Measurements, index: int
) -> None:
    body = {
        "model": MODEL_NAME,
        "temperature": 0,
        "max_tokens": 48,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Tell story number {index} about a fox."}],
    }
    while time.monotonic() < deadline:
        stamps: list[float] = []
        tokens = 0
        try:
            async with client.stream(
                "POST", f"{base_url}/v1/chat/completions", json=body
            ) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                        stamps.append(time.perf_counter())
        except httpx.HTTPError:
            out.errors += 1
            continue
        if len(stamps) > 1 and tokens > 1:
            out.tpot_s.append((stamps[-1] - stamps[0]) / (tokens - 1))
            out.itl_s.extend(b - a for a, b in itertools.pairwise(stamps))
        out.streams_done += 1


async def _long_prompts(
    client: httpx.AsyncClient,
    base_url: str,
    prompt: str,
    deadline: float,
    interval_s: float,
    out: Measurements,
) -> None:
    async def one() -> None:
        started = time.perf_counter()
        try:
            response = await client.post(
                f"{base_url}/v1/completions",
                json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0},
            )
            response.raise_for_status()
            out.long_ttft_s.append(time.perf_counter() - started)
            out.long_done += 1
        except httpx.HTTPError:
            out.errors += 1

    tasks = []
    while time.monotonic() < deadline:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(interval_s)
    await asyncio.gather(*tasks)


async def run_load(base_url: str, args: argparse.Namespace, prompt: str) -> Measurements:
    out = Measurements()
    deadline = time.monotonic() + args.duration_s
    limits = httpx.Limits(max_connections=args.streams + 64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        workers = [_stream_client(client, base_url, deadline, out, i) for i in range(args.streams)]
        await asyncio.gather(
            *workers, _long_prompts(client, base_url, prompt, deadline, args.interval_s, out)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-prompt-tokens", type=int, default=2048)
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk and step budget")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results/pd-vs-colocated"))
    args = parser.parse_args(argv)

    model_dir = resolve_model_dir(args.model_path)
    # About one token per word of this filler with the default tokenizer; the gateway
    # counts exactly, the number here only sets the scale.
    prompt = " ".join(f"w{i % 97}" for i in range(args.long_prompt_tokens // 2))
    results: dict[str, Measurements] = {}
    for mode in tqdm(["pd", "colocated"], desc="configurations"):
        with tempfile.TemporaryDirectory() as tmp:
            processes: list[ChildProcess] = []
            try:
                base_url = start_configuration(mode, model_dir, Path(tmp), args.chunk, processes)
                results[mode] = asyncio.run(run_load(base_url, args, prompt))
            finally:
                for process in reversed(processes):
                    process.stop()

    table = Table(
        title=f"{args.streams} streams + a {args.long_prompt_tokens}-token prompt "
        f"every {args.interval_s:g} s, {args.duration_s:g} s each"
    )
    for column in (
        "",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "streams done",
        "long prompts done",
        "long TTFT p50 s",
        "errors",
    ):
        table.add_column(column, justify="right")
    summary: dict[str, dict[str, float]] = {}
    for mode, m in results.items():
        row = {
            "tpot_p50_ms": _percentile(m.tpot_s, 50) * 1e3,
            "tpot_p99_ms": _percentile(m.tpot_s, 99) * 1e3,
            "itl_p50_ms": _percentile(m.itl_s, 50) * 1e3,
            "itl_p99_ms": _percentile(m.itl_s, 99) * 1e3,
            "streams_done": m.streams_done,
            "long_done": m.long_done,
            "long_ttft_p50_s": statistics.median(m.long_ttft_s) if m.long_ttft_s else 0.0,
            "errors": m.errors,
        }
        summary[mode] = row
        table.add_row(mode, *(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
    if "pd" in summary and "colocated" in summary:
        ratio = summary["colocated"]["tpot_p99_ms"] / summary["pd"]["tpot_p99_ms"]
        print(f"TPOT p99: colocated / PD = {ratio:.2f}x")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(
        json.dumps(
            {"config": vars(args) | {"out_dir": str(args.out_dir)}, "results": summary}, indent=2
        )
    )
    figure, axis = plt.subplots(figsize=(7, 4))
    for mode, m in results.items():
        ordered = sorted(v * 1e3 for v in m.itl_s)
        if ordered:
            axis.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=mode)
    axis.set_xscale("log")
    axis.set_xlabel("inter-token latency (ms)")
    axis.set_ylabel("fraction of tokens")
    axis.set_title("decode under prefill interference")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out_dir / "itl_cdf.png", dpi=120)
    print(f"wrote {args.out_dir}/summary.json and itl_cdf.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
