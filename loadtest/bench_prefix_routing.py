"""Shared-prefix workload under each routing policy: TTFT and prefix hit rate.

    python -m loadtest.bench_prefix_routing [--policies prefix,approx,round_robin]
        [--groups 8 --prompts-per-group 8 --prefix-tokens 1500 --question-tokens 100
         --output-tokens 32 --rate 0.5 --prefill-kv-cache-mb 400]

For each policy, starts a cluster (a private Redis, 2 prefill workers, 1 decode worker,
a gateway with `--router-policy POLICY`), sends the same workload, streams the answers,
and stops the cluster. The workload is chat requests in groups: every prompt of a group
has the same long system prompt and its own question; the requests come in random order
with Poisson arrivals. Per policy: TTFT p50/p99 and the prefix hit rate (prompt tokens
prefill found cached, from each answer's usage). Also the hit rate of an oracle: one
unbounded cache that has seen every earlier prompt, the most any routing can reach.
Each prefill worker's KV pool (--prefill-kv-cache-mb) decides how many prefixes it keeps:
the default keeps about five of the default model's, half the groups and some room.
Writes summary.json, requests.jsonl, ttft.png and the services' logs to --output-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoTokenizer

from services.processes import ChildProcess, free_port, grpc_serving, http_healthy
from services.redis_server import RedisServer
from shared.block_hash import block_hashes
from shared.config import served_model_name
from shared.model.loader import resolve_model_dir

BLOCK = 16
MODEL_NAME = "bench-model"
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Job:
    group: int
    send_at: float  # seconds after the start
    messages: list[dict[str, str]]
    prompt_ids: list[int]  # the prompt as the gateway renders and tokenizes it


@dataclass
class Outcome:
    policy: str
    group: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    e2e_s: float
    output_tokens: int
    error: str | None = None


NAMES = ("Ada", "Bram", "Chen", "Dara", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Jun")
THINGS = ("bridge", "harvest", "ledger", "archive", "reactor", "orchard", "tunnel", "market")


def sentences(rng: random.Random) -> Iterator[str]:
    """Plain English with random names and figures: text the model reads normally."""
    while True:
        yield (f"{rng.choice(NAMES)} inspected the {rng.choice(THINGS)} in sector "
               f"{rng.randrange(1, 500)} and reported {rng.randrange(2, 900)} units, "
               f"{rng.choice(('up', 'down'))} {rng.randrange(1, 60)} percent on the year. ")


def text_of(tokenizer: Any, rng: random.Random, tokens: int, tail: str = "") -> str:
    """Sentences of about `tokens` tokens in all, `tail` last."""
    text, count = "", len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    for sentence in sentences(rng):
        if count >= tokens:
            break
        text += sentence
        count += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    return text + tail


def build_workload(args: argparse.Namespace, tokenizer: Any) -> list[Job]:
    rng = random.Random(args.seed)
    systems = [text_of(tokenizer, rng, args.prefix_tokens) for _ in range(args.groups)]
    requests = []
    for group in range(args.groups):
        for _ in range(args.prompts_per_group):
            question = text_of(tokenizer, rng, args.question_tokens,
                               "Which sector grew the most, and by how much?")
            messages = [{"role": "system", "content": systems[group]},
                        {"role": "user", "content": question}]
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=False)
            ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
            requests.append((group, messages, ids))
    rng.shuffle(requests)
    jobs, clock = [], 0.0
    for group, messages, ids in requests:
        jobs.append(Job(group, clock, messages, ids))
        clock += rng.expovariate(args.rate)
    return jobs


def oracle_hit_rate(jobs: Sequence[Job]) -> float:
    """One unbounded cache that saw every earlier prompt (prefill computes >= 1 token)."""
    seen: set[bytes] = set()
    hit = total = 0
    for job in jobs:
        hashes = block_hashes(job.prompt_ids, BLOCK, model=MODEL_NAME)
        blocks = 0
        for h in hashes:
            if h not in seen:
                break
            blocks += 1
        hit += min(blocks * BLOCK, len(job.prompt_ids) - 1)
        total += len(job.prompt_ids)
        seen.update(hashes)
    return hit / total


async def send(client: httpx.AsyncClient, base_url: str, job: Job, policy: str,
               output_tokens: int, started: float) -> Outcome:
    await asyncio.sleep(max(0.0, started + job.send_at - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": MODEL_NAME, "messages": job.messages, "max_tokens": output_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    ttft = 0.0
    usage: dict[str, Any] = {}
    prompt_tokens = len(job.prompt_ids)

    def failed(error: str) -> Outcome:
        return Outcome(policy, job.group, prompt_tokens, 0, 0.0, 0.0, 0, error)

    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions",
                                 json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return failed(f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return failed(str(chunk["error"])[:200])
                if not ttft and any(c.get("delta", {}).get("content")
                                    for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - sent  # the first chunk with content
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        return failed(repr(exc))
    if not ttft:
        return failed("no content came back")
    details = usage.get("prompt_tokens_details") or {}
    return Outcome(policy, job.group, int(usage.get("prompt_tokens", prompt_tokens)),
                   int(details.get("cached_tokens", 0)), ttft, time.perf_counter() - sent,
                   int(usage.get("completion_tokens", 0)))


async def run_workload(base_url: str, jobs: Sequence[Job], policy: str, args: argparse.Namespace
                       ) -> list[Outcome]:
    limits = httpx.Limits(max_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        # Warm-up: the first forward passes of a process are slow; this prompt shares nothing.
        # Two at once, so that both prefill workers get one.
        warm = [Job(-1, 0.0, job.messages[1:], []) for job in jobs[:2]]
        await asyncio.gather(*(send(client, base_url, w, policy, 4, time.perf_counter())
                               for w in warm))
        started = time.perf_counter()
        tasks = [asyncio.create_task(send(client, base_url, job, policy, args.output_tokens,
                                          started)) for job in jobs]
        outcomes = []
        for task in tqdm(asyncio.as_completed(tasks), total=len(tasks), desc=policy,
                         unit="req"):
            outcomes.append(await task)
    return outcomes


def scrape(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{label}}}" if label else "")] = float(sample.value)
    return values


def start_cluster(policy: str, model_dir: Path, args: argparse.Namespace
                  ) -> tuple[str, list[ChildProcess]]:
    """Redis, 2 prefill workers, 1 decode worker and a gateway; returns the gateway's URL.

    Not `kvrelay up`: prefill's KV pool is kept small (it decides what stays cached),
    decode's large (so that no request waits for decode pages).
    """
    processes: list[ChildProcess] = []
    logs = args.output_dir / f"logs-{policy}"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        redis = RedisServer(logs)
        processes.append(redis.process)
        redis.start()
        common = ["--model-path", str(model_dir), "--served-model-name", MODEL_NAME,
                  "--redis-url", redis.url, "--num-threads", str(args.num_threads)]
        addresses: dict[str, list[str]] = {"prefill": [], "decode": []}
        for role, count, kv_mb in (("prefill", 2, args.prefill_kv_cache_mb),
                                   ("decode", 1, args.decode_kv_cache_mb)):
            for index in range(count):
                port = free_port()
                processes.append(ChildProcess.kvrelay(
                    f"{role}-{index}", [role, "--port", str(port), "--kv-cache-mb", str(kv_mb),
                                        *common], log_path=logs / f"{role}-{index}.log",
                ).start())
                addresses[role].append(f"127.0.0.1:{port}")
        for process, address in zip(processes[1:], addresses["prefill"] + addresses["decode"],
                                    strict=True):
            process.wait_ready(partial(grpc_serving, address), READY_TIMEOUT_S)
        port = free_port()
        gateway = ChildProcess.kvrelay(
            "gateway",
            ["gateway", "--port", str(port), "--model-path", str(model_dir),
             "--served-model-name", MODEL_NAME, "--redis-url", redis.url,
             "--router-policy", policy, "--prefill-addrs", ",".join(addresses["prefill"]),
             "--decode-addrs", ",".join(addresses["decode"])],
            log_path=logs / "gateway.log",
        ).start()
        processes.append(gateway)
        base_url = f"http://127.0.0.1:{port}"
        gateway.wait_ready(lambda: http_healthy(f"{base_url}/health"), READY_TIMEOUT_S)
        return base_url, processes
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise


def run_policy(policy: str, jobs: Sequence[Job], model_dir: Path, args: argparse.Namespace
               ) -> tuple[list[Outcome], dict[str, float]]:
    base_url, processes = start_cluster(policy, model_dir, args)
    try:
        outcomes = asyncio.run(run_workload(base_url, jobs, policy, args))
        return outcomes, scrape(base_url)
    finally:
        for process in reversed(processes):
            process.stop(grace_s=30)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarise(policy: str, outcomes: Sequence[Outcome], metrics: dict[str, float]
              ) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    ttfts = [o.ttft_s for o in ok]
    prompt = sum(o.prompt_tokens for o in ok)
    return {
        "policy": policy,
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"),
        "e2e_p50_s": percentile([o.e2e_s for o in ok], 50),
        "hit_rate": sum(o.cached_tokens for o in ok) / prompt if prompt else 0.0,
        "gateway_metrics": {k: v for k, v in metrics.items()
                            if k.startswith(("kvrelay_gateway_routed", "kvrelay_prefix_cache",
                                             "kvrelay_gateway_predicted"))},
    }


def plot(results: dict[str, list[Outcome]], summaries: list[dict[str, Any]], oracle: float,
         path: Path, title: str) -> None:
    fig = Figure(figsize=(12, 4.8))
    cdf, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for policy, outcomes in results.items():
        values = sorted(o.ttft_s for o in outcomes if o.error is None)
        if values:
            cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=policy)
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (s, log scale)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("TTFT CDF")
    cdf.grid(True, alpha=0.3)
    cdf.legend()
    names = [s["policy"] for s in summaries]
    x = range(len(names))
    bars.bar([i - 0.2 for i in x], [s["ttft_p50_s"] for s in summaries], 0.4, label="TTFT p50")
    bars.bar([i + 0.2 for i in x], [s["ttft_p99_s"] for s in summaries], 0.4, label="TTFT p99")
    bars.set_xticks(list(x), names)
    bars.set_ylabel("seconds")
    rates = bars.twinx()
    rates.plot(list(x), [s["hit_rate"] for s in summaries], "ko-", label="hit rate")
    rates.axhline(oracle, color="grey", linestyle="--", label=f"oracle hit rate {oracle:.2f}")
    rates.set_ylim(0, 1)
    rates.set_ylabel("prefix hit rate")
    handles = bars.get_legend_handles_labels()
    more = rates.get_legend_handles_labels()
    bars.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    bars.set_title("TTFT and hit rate by policy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="prefix,approx,round_robin")
    parser.add_argument("--model-path", default=None, help="default: the default model")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompts-per-group", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second")
    parser.add_argument("--prefill-kv-cache-mb", type=int, default=400,
                        help="KV pool of each prefill worker: what stays cached")
    parser.add_argument("--decode-kv-cache-mb", type=int, default=3000)
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results/prefix-routing"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    model_dir = resolve_model_dir(args.model_path)
    jobs = build_workload(args, AutoTokenizer.from_pretrained(model_dir))
    oracle = oracle_hit_rate(jobs)
    console.print(f"{len(jobs)} requests over {jobs[-1].send_at:.0f} s on "
                  f"{served_model_name(args.model_path)}; oracle hit rate {oracle:.3f}")

    results: dict[str, list[Outcome]] = {}
    summaries = []
    for policy in policies:
        outcomes, metrics = run_policy(policy, jobs, model_dir, args)
        results[policy] = outcomes
        summaries.append(summarise(policy, outcomes, metrics))

    with (args.output_dir / "requests.jsonl").open("w") as out:
        for outcomes in results.values():
            for outcome in outcomes:
                out.write(json.dumps(asdict(outcome)) + "\n")
    summary = {"workload": {k: getattr(args, k) for k in (
        "groups", "prompts_per_group", "prefix_tokens", "question_tokens", "output_tokens",
        "rate", "prefill_kv_cache_mb", "decode_kv_cache_mb", "num_threads", "seed")},
        "model": served_model_name(args.model_path), "oracle_hit_rate": oracle,
        "policies": summaries}
    by_policy = {s["policy"]: s for s in summaries}
    if "prefix" in by_policy and "round_robin" in by_policy and by_policy["prefix"]["ttft_p50_s"]:
        summary["ttft_p50_round_robin_over_prefix"] = (
            by_policy["round_robin"]["ttft_p50_s"] / by_policy["prefix"]["ttft_p50_s"])
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, summaries, oracle, args.output_dir / "ttft.png",
         f"{args.groups} groups x {args.prompts_per_group} prompts, {args.prefix_tokens}-token "
         f"prefix, {args.rate}/s, 2 prefill + 1 decode")

    table = Table(title="shared-prefix workload by routing policy")
    for column in ("policy", "TTFT p50 s", "TTFT p99 s", "hit rate", "errors"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for s in summaries:
        table.add_row(s["policy"], f"{s['ttft_p50_s']:.3f}", f"{s['ttft_p99_s']:.3f}",
                      f"{s['hit_rate']:.3f}", str(s["errors"]))
    table.add_row("oracle", "", "", f"{oracle:.3f}", "")
    console.print(table)
    if "ttft_p50_round_robin_over_prefix" in summary:
        console.print(f"round_robin / prefix TTFT p50: "
                      f"{summary['ttft_p50_round_robin_over_prefix']:.2f}x")
    console.print(f"results in {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
