"""TTFT and decode speed of one request: kvrelay (`kvrelay up`) next to HF transformers.

    python -m loadtest.single_request [--prompt-tokens 512] [--max-tokens 64] [--runs 3]

Starts a private cluster on a free port with the default model (or --model-path),
streams the same greedy request several times, then times HF transformers' `generate`
on the same weights in this process. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.processes import ChildProcess, free_port, http_healthy
from shared.config import served_model_name
from shared.model.loader import resolve_model_dir

FILLER = (
    "The committee reviewed the quarterly figures, compared them with last year's, and "
    "asked the regional offices to explain every variance larger than five percent. "
)


def build_messages(tokenizer: Any, prompt_tokens: int) -> tuple[list[dict[str, str]], int]:
    """A chat whose rendered prompt has about prompt_tokens tokens."""
    text = ""
    while True:
        messages = [{"role": "user", "content": f"{text}Summarise the text above at length."}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        length = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if length >= prompt_tokens:
            return messages, length
        text += FILLER


def time_kvrelay(base_url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
                 runs: int) -> list[dict[str, float]]:
    results = []
    with httpx.Client(timeout=600) as client:
        for run in tqdm(range(runs + 1), desc="kvrelay", unit="req"):
            # A different first line each run: no run may reuse another's cached prefix,
            # so every TTFT includes the whole prompt's prefill, as HF's does.
            unique = [{**messages[0], "content": f"Run {run}.\n{messages[0]['content']}"}]
            started = time.perf_counter()
            first = last = 0.0
            completion_tokens = 0
            body = {"model": model, "messages": unique, "temperature": 0,
                    "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        completion_tokens = chunk["usage"]["completion_tokens"]
                    if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                        last = time.perf_counter()
                        first = first or last
            results.append({"ttft_s": first - started, "decode_s": last - first,
                            "tokens": completion_tokens})
    return results[1:]  # the first run warms up both workers


def time_hf(model_dir: Path, prompt_ids: list[int], max_tokens: int,
            runs: int) -> list[dict[str, float]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    results = []
    for _ in tqdm(range(runs + 1), desc="HF transformers", unit="req"):
        with torch.inference_mode():
            started = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)
            total = time.perf_counter() - started
        tokens = out.shape[1] - ids.shape[1]
        results.append({"ttft_s": ttft, "decode_s": total - ttft, "tokens": tokens})
    return results[1:]


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    rates = [(r["tokens"] - 1) / r["decode_s"] for r in runs if r["tokens"] > 1 and r["decode_s"]]
    return {"ttft_ms": ttft * 1e3, "decode_tok_s": statistics.median(rates) if rates else 0.0,
            "tokens": statistics.median(r["tokens"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("single_request.json"))
    args = parser.parse_args(argv)

    model_dir = resolve_model_dir(args.model_path)
    model_name = served_model_name(args.model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages, prompt_len = build_messages(tokenizer, args.prompt_tokens)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ChildProcess.kvrelay(
            "kvrelay up",
            ["up", "--port", str(port), "--model-path", str(model_dir),
             "--served-model-name", model_name, "--no-redis", "--log-level", "warning"],
            log_path=Path(tmp) / "cluster.log",
        ).start()
        try:
            cluster.wait_ready(lambda: http_healthy(f"http://127.0.0.1:{port}/health"), 300)
            ours = time_kvrelay(f"http://127.0.0.1:{port}", model_name, messages,
                                args.max_tokens, args.runs)
        finally:
            cluster.stop()
    theirs = time_hf(model_dir, prompt_ids, args.max_tokens, args.runs)

    summary = {"prompt_tokens": prompt_len, "max_tokens": args.max_tokens, "runs": args.runs,
               "kvrelay": summarise(ours), "hf_transformers": summarise(theirs),
               "raw": {"kvrelay": ours, "hf_transformers": theirs}}
    table = Table(title=f"one request, {prompt_len}-token prompt, {args.max_tokens} tokens, "
                        f"median of {args.runs}")
    for column in ("metric", "kvrelay (PD, 2 processes)", "HF transformers", "ratio"):
        table.add_column(column, justify="right")
    k, h = summary["kvrelay"], summary["hf_transformers"]
    table.add_row("TTFT ms", f"{k['ttft_ms']:.1f}", f"{h['ttft_ms']:.1f}",
                  f"{h['ttft_ms'] / k['ttft_ms']:.2f}x faster" if k["ttft_ms"] else "-")
    table.add_row("decode tok/s", f"{k['decode_tok_s']:.1f}", f"{h['decode_tok_s']:.1f}",
                  f"{k['decode_tok_s'] / h['decode_tok_s']:.2f}x" if h["decode_tok_s"] else "-")
    table.add_row("tokens", f"{k['tokens']:.0f}", f"{h['tokens']:.0f}", "")
    Console().print(table)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
