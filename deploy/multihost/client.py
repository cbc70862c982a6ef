"""The multi-host test's client, run inside the client host's namespace.

    python -m deploy.multihost.client health URL --prefill 2 --decode 2 --timeout-s 60
    python -m deploy.multihost.client load URL --requests 8 --concurrency 4 ...
    python -m deploy.multihost.client tokenless HOST:PORT --role prefill

`load` streams /v1/completions with token-id prompts (exact lengths, no tokenizer needed)
and prints one JSON line per finished request, then a summary line: the orchestrator reads
them as they come (it kills a decode worker after the first few).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx


@dataclass
class RequestResult:
    index: int
    ok: bool
    status: int
    error: str  # "" when ok; else the error body's type or the exception's name
    message: str
    completion_tokens: int
    ttft_s: float | None
    latency_s: float


def _prompt(seed: int, length: int) -> list[int]:
    # Ids past the special tokens; a different prompt per request (no shared prefix).
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(length)]


async def _one(
    client: httpx.AsyncClient, url: str, model: str, index: int, args: argparse.Namespace
) -> RequestResult:
    body = {
        "model": model,
        "prompt": _prompt(args.seed * 100003 + index, args.prompt_tokens),
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    ttft: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = json.loads(await response.aread()).get("error", {})
                return RequestResult(
                    index,
                    False,
                    response.status_code,
                    str(error.get("type")),
                    str(error.get("message")),
                    0,
                    None,
                    time.monotonic() - started,
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    error = chunk["error"]
                    return RequestResult(
                        index,
                        False,
                        200,
                        str(error.get("type")),
                        str(error.get("message")),
                        tokens,
                        ttft,
                        time.monotonic() - started,
                    )
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                    ttft = time.monotonic() - started
    except httpx.HTTPError as exc:
        return RequestResult(
            index, False, 0, type(exc).__name__, str(exc), tokens, ttft, time.monotonic() - started
        )
    ok = tokens == args.max_tokens
    return RequestResult(
        index,
        ok,
        200,
        "" if ok else "short",
        "" if ok else f"{tokens} of {args.max_tokens} tokens",
        tokens,
        ttft,
        time.monotonic() - started,
    )


async def _load(args: argparse.Namespace) -> int:
    timeout = httpx.Timeout(args.timeout_s, connect=5.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        model = (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.concurrency)
        results: list[RequestResult] = []

        async def run(index: int) -> None:
            async with gate:
                result = await _one(client, args.url, model, index, args)
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)

        # Bounded in time: the summary counts what did not finish.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(run(i) for i in range(args.requests))), args.timeout_s
            )
    summary = {
        "requests": args.requests,
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "unfinished": args.requests - len(results),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


async def _health(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout_s
    body: dict[str, object] = {}
    async with httpx.AsyncClient(timeout=3.0) as client:
        while time.monotonic() < deadline:
            try:
                body = (await client.get(f"{args.url}/health")).json()
            except (httpx.HTTPError, ValueError):
                body = {}
            prefill = body.get("prefill", {})
            decode = body.get("decode", {})
            healthy_prefill = (
                sum(bool(v) for v in prefill.values()) if isinstance(prefill, dict) else 0
            )
            healthy_decode = (
                sum(bool(v) for v in decode.values()) if isinstance(decode, dict) else 0
            )
            if healthy_prefill == args.prefill and healthy_decode == args.decode:
                print(json.dumps(body), flush=True)
                return 0
            await asyncio.sleep(0.5)
    print(json.dumps(body), flush=True)
    return 1


def _tokenless(args: argparse.Namespace) -> int:
    """GetInfo on a worker without the internal token; prints the gRPC status it ends with."""
    import grpc

    from shared.rpc import kvrelay_pb2, kvrelay_pb2_grpc

    with grpc.insecure_channel(args.addr) as channel:
        stub: Any = (
            kvrelay_pb2_grpc.PrefillWorkerStub
            if args.role == "prefill"
            else kvrelay_pb2_grpc.DecodeWorkerStub
        )(channel)
        try:
            stub.GetInfo(kvrelay_pb2.WorkerInfoRequest(), timeout=args.timeout_s)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    print(json.dumps({"addr": args.addr, "code": code}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.multihost.client")
    commands = parser.add_subparsers(dest="command", required=True)
    health = commands.add_parser("health", help="wait until /health shows these healthy workers")
    health.add_argument("url")
    health.add_argument("--prefill", type=int, required=True)
    health.add_argument("--decode", type=int, required=True)
    health.add_argument("--timeout-s", type=float, default=60.0)
    load = commands.add_parser("load", help="streamed completions, one JSON line each")
    load.add_argument("url")
    load.add_argument("--requests", type=int, default=8)
    load.add_argument("--concurrency", type=int, default=4)
    load.add_argument("--prompt-tokens", type=int, default=512)
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout-s", type=float, default=60.0)
    tokenless = commands.add_parser("tokenless", help="a worker call without the internal token")
    tokenless.add_argument("addr")
    tokenless.add_argument("--role", choices=["prefill", "decode"], required=True)
    tokenless.add_argument("--timeout-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "tokenless":
        return _tokenless(args)
    return asyncio.run(_health(args) if args.command == "health" else _load(args))


if __name__ == "__main__":
    sys.exit(main())
