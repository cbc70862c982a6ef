"""Engine throughput next to HF transformers (eager) on the same weights, in one run.

    python -m loadtest.bench_engine [--model-path DIR] [--dtype float32] [--steps 16]

Decode: aggregate tokens/s of batched decode steps at batch 1, 8 and 32, with prompts of
each of --contexts tokens already in the KV cache (attention's share of a step grows with
it). Prefill: tokens/s of one 512- and one
2048-token prompt. kvrelay runs its own forward over the paged KV pool; HF runs
`model(...)` with its DynamicCache and attn_implementation="eager". Greedy sampling on
both sides, each with its own (kvrelay: its sampler's `greedy`; HF: argmax, as its generate).
Prints a table with the ratios and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from shared.config import DTYPES
from shared.model.decoder import DecoderModel
from shared.model.linear import QUANTIZED_MAX_ROWS
from shared.model.loader import resolve_model_dir
from shared.model.runner import ModelRunner, SeqSlice
from shared.sampler import greedy


def _best_of(repeats: int, run: Callable[[], float]) -> float:
    """Fastest of several runs: the least disturbed by the rest of the machine."""
    return min(run() for _ in range(repeats))


def kvrelay_decode(runner: ModelRunner, batch: int, context: int, steps: int) -> float:
    pool = runner.pool
    generator = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(3, runner.config.vocab_size, (context,), generator=generator).tolist()
        for _ in range(batch)
    ]
    pages = [pool.allocate(pool.pages_for(context + steps)) for _ in range(batch)]
    try:
        runner.forward([SeqSlice(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)])
        last = [p[-1] for p in prompts]

        def run() -> float:
            tokens = list(last)
            started = time.perf_counter()
            for step in range(steps):
                slices = [
                    SeqSlice([t], context + step, pg) for t, pg in zip(tokens, pages, strict=True)
                ]
                tokens = greedy(runner.forward(slices)).tolist()
            return time.perf_counter() - started

        return batch * steps / _best_of(2, run)
    finally:
        for page_list in pages:
            pool.free(page_list)


def hf_decode(model: torch.nn.Module, vocab: int, batch: int, context: int, steps: int) -> float:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, context), generator=generator)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def run() -> float:
            step_cache = type(cache)()
            for layer in range(len(cache.layers)):  # a fresh copy per run
                step_cache.update(
                    cache.layers[layer].keys.clone(), cache.layers[layer].values.clone(), layer
                )
            tokens = last
            started = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=tokens, past_key_values=step_cache, use_cache=True)
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - started

        return batch * steps / _best_of(2, run)


def kvrelay_prefill(runner: ModelRunner, length: int) -> float:
    pool = runner.pool
    prompt = torch.randint(
        3, runner.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length)
    ).tolist()

    def run() -> float:
        pages = pool.allocate(pool.pages_for(length))
        try:
            started = time.perf_counter()
            runner.forward([SeqSlice(prompt, 0, pages)])
            return time.perf_counter() - started
        finally:
            pool.free(pages)

    return length / _best_of(3, run)


def hf_prefill(model: torch.nn.Module, vocab: int, length: int) -> float:
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))

    def run() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            return time.perf_counter() - started

    return length / _best_of(3, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prefill-lengths", default="512,2048")
    parser.add_argument(
        "--contexts", default="128,512", help="tokens cached per sequence, one row set each"
    )
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per batch")
    parser.add_argument("--out", type=Path, default=Path("bench_engine.json"))
    args = parser.parse_args(argv)

    model_dir = resolve_model_dir(args.model_path)
    dtype = DTYPES[args.dtype]
    runner = ModelRunner(model_dir, dtype=dtype, kv_cache_mb=2048)
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager"
    ).eval()
    vocab = runner.config.vocab_size
    rows: list[dict[str, float | str]] = []
    console = Console()
    with console.status("measuring") as status:
        for context in (int(c) for c in args.contexts.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                status.update(f"decode, batch {batch}, context {context}")
                ours = kvrelay_decode(runner, batch, context, args.steps)
                theirs = hf_decode(hf, vocab, batch, context, args.steps)
                what = f"decode tok/s, batch {batch}, context {context}"
                rows.append({"what": what, "kvrelay": ours, "hf": theirs})
        for length in (int(n) for n in args.prefill_lengths.split(",")):
            status.update(f"prefill, {length} tokens")
            ours = kvrelay_prefill(runner, length)
            theirs = hf_prefill(hf, vocab, length)
            rows.append({"what": f"prefill tok/s, {length} tokens", "kvrelay": ours, "hf": theirs})
    table = Table(title=f"engine throughput, {args.dtype}, {torch.get_num_threads()} threads")
    for column in ("", "kvrelay", "HF eager", "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        ours, theirs = float(row["kvrelay"]), float(row["hf"])
        row["ratio"] = ours / theirs
        table.add_row(str(row["what"]), f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x")
    console.print(table)
    if isinstance(runner.model, DecoderModel):
        reading, total = runner.model.linears_reading_blocks(), len(runner.model.linears())
        if reading:
            # Honest labelling: the same bfloat16 weights, streamed as the GGUF stores them.
            console.print(
                f"kvrelay: {reading} of {total} matmuls of up to {QUANTIZED_MAX_ROWS} "
                "rows read the GGUF blocks, widened to the bfloat16 weights HF multiplies with"
            )
    summary = {
        "dtype": args.dtype,
        "contexts": args.contexts,
        "steps": args.steps,
        "geomean_ratio": statistics.geometric_mean(float(r["ratio"]) for r in rows),
        "rows": rows,
    }
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
