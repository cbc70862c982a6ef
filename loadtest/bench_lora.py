"""Decode throughput with LoRA adapters: one batch, its rows spread over 0, 1 or 4 adapters.

    python -m loadtest.bench_lora [--model-path DIR] [--batch 16] [--rank 16] [--steps 32]

Every sequence of the batch has --context tokens in the KV cache; each decode step is one
forward of the whole batch (what the decode engine runs). "no LoRA" is a runner without
LoRA; "LoRA on, base rows" enables it but no row uses an adapter; "N adapters" spreads the
rows evenly over N distinct random adapters of --rank on all seven projections (q, k, v,
o, gate, up, down), applied batched in the same forward. The configurations take turns
step by step (a shared machine's busy spells hit all alike); tokens/s is the batch over the
median step time. Prints the table with the ratio to no LoRA; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from shared.config import DTYPES
from shared.model.config import ModelConfig
from shared.model.loader import resolve_model_dir
from shared.model.lora import ATTENTION_MODULES, TARGET_MODULES, LoraAdapter, module_shapes
from shared.model.runner import ModelRunner, SeqSlice


def write_random_adapter(out_dir: Path, config: ModelConfig, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random A and B on every projection of every layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_layers):
        for module, (in_features, out_features) in module_shapes(config).items():
            parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            b = torch.randn(out_features, rank, generator=generator) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGET_MODULES),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out_dir


class DecodeBatch:
    """A batch of sequences with --context tokens in the KV cache, one adapter per row."""

    def __init__(
        self, runner: ModelRunner, adapters: Sequence[LoraAdapter | None], context: int, steps: int
    ) -> None:
        self.runner, self.adapters, self.context, self.steps = runner, adapters, context, steps
        pool, batch = runner.pool, len(adapters)
        generator = torch.Generator().manual_seed(batch)
        prompts = [
            torch.randint(3, runner.config.vocab_size, (context,), generator=generator).tolist()
            for _ in range(batch)
        ]
        self.pages = [pool.allocate(pool.pages_for(context + steps)) for _ in range(batch)]
        logits = runner.forward(
            [SeqSlice(p, 0, pg, a) for p, pg, a in zip(prompts, self.pages, adapters, strict=True)]
        )
        self.first = logits.argmax(dim=-1).tolist()
        self.tokens = list(self.first)

    def step_seconds(self, step: int) -> float:
        """One decode step of the whole batch at position context + step (pages rewritten)."""
        if step == 0:
            self.tokens = list(self.first)
        slices = [
            SeqSlice([t], self.context + step, pg, a)
            for t, pg, a in zip(self.tokens, self.pages, self.adapters, strict=True)
        ]
        _sync(self.runner)
        started = time.perf_counter()
        logits = self.runner.forward(slices)
        _sync(self.runner)
        elapsed = time.perf_counter() - started
        self.tokens = logits.argmax(dim=-1).tolist()
        return elapsed

    def free(self) -> None:
        for page_list in self.pages:
            self.runner.pool.free(page_list)


def _sync(runner: ModelRunner) -> None:
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_lora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128, help="tokens already in the KV cache")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of --steps per config")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", default="1,4", help="distinct adapters per batch")
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.adapters.split(",") if c.strip()]
    model_dir = resolve_model_dir(args.model_path)
    runner = ModelRunner(
        model_dir,
        dtype=DTYPES[args.dtype],
        kv_cache_mb=args.kv_cache_mb,
        num_threads=args.num_threads,
        device=args.device,
    )
    batch_pages = runner.pool.pages_for(args.context + args.steps) * args.batch
    if batch_pages * (2 + len(counts)) > runner.pool.num_pages:  # every batch stays resident
        parser.error("the KV pool cannot hold the batches: raise --kv-cache-mb")
    console = Console()
    batches: dict[str, DecodeBatch] = {
        "no LoRA": DecodeBatch(runner, [None] * args.batch, args.context, args.steps)
    }
    registry = runner.enable_lora(max_loras_per_batch=max([*counts, 1]))
    with tempfile.TemporaryDirectory(prefix="kvrelay-lora-bench-") as tmp:
        adapters = [
            registry.load(
                f"bench-{i}",
                str(write_random_adapter(Path(tmp) / str(i), runner.config, args.rank, seed=i)),
            )
            for i in range(max([*counts, 1]))
        ]
    configs: dict[str, list[LoraAdapter | None]] = {"LoRA on, base rows": [None] * args.batch}
    for count in counts:
        label = f"{count} adapter{'s' if count > 1 else ''}"
        configs[label] = [adapters[i * count // args.batch] for i in range(args.batch)]
    for label, per_row in configs.items():
        batches[label] = DecodeBatch(runner, per_row, args.context, args.steps)
    # The configurations take turns step by step: a busy spell of the shared machine slows
    # all of them alike, and the median step of each counts.
    times: dict[str, list[float]] = {label: [] for label in batches}
    for round_index in range(args.repeats):
        for step in range(args.steps):
            for label, batch in batches.items():
                times[label].append(batch.step_seconds(step))
        console.print(
            f"round {round_index + 1}: "
            + ", ".join(
                f"{label} {1e3 * statistics.median(t):.1f} ms" for label, t in times.items()
            )
        )
    for batch in batches.values():
        batch.free()
    rows: list[dict[str, float | str]] = []
    for label, step_times in times.items():
        median = statistics.median(step_times)
        rows.append(
            {"config": label, "tokens_per_s": args.batch / median, "ms_per_step": 1e3 * median}
        )
    baseline = float(rows[0]["tokens_per_s"])
    table = Table(
        title=f"decode, batch {args.batch}, context {args.context}, rank {args.rank}, "
        f"{args.dtype} on {runner.device} ({torch.get_num_threads()} threads)"
    )
    for column in ("config", "tokens/s", "ms/step", "vs no LoRA"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        tps = float(row["tokens_per_s"])
        row["ratio"] = tps / baseline
        table.add_row(
            str(row["config"]),
            f"{tps:.1f}",
            f"{float(row['ms_per_step']):.1f}",
            f"{tps / baseline:.2f}",
        )
    console.print(table)
    if args.out is not None:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
