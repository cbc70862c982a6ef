"""Embeddings on a prefill worker: prompts through the model, last hidden states pooled.

Pooling follows the model: a sentence-transformers config (`modules.json` naming a Pooling
module, whose `config.json` says mean, last-token or CLS pooling; a Normalize module for
L2 normalisation) is honoured. Without one, a decoder model's embedding is its last
token's final hidden state, L2-normalised, as SGLang does for decoder models.

Only the forward touches the KV pool: each prompt borrows pages for its own KV and gives
them back at once; nothing enters the prefix cache and nothing goes to a decode worker.
The engine thread runs each group of prompts (`run_group`) between two of its steps:
`serve` is the Embed call of prefill workers and of colocated ones alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import torch

from shared.kv_pool import KVPoolExhausted
from shared.model.runner import ModelRunner, SeqSlice
from shared.rpc import kvrelay_pb2 as pb

log = logging.getLogger(__name__)

POOLING_MODES = ("last", "mean", "cls")
# sentence-transformers' Pooling config keys -> our modes (the first one set wins).
_ST_MODES = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}


@dataclass(frozen=True)
class Pooling:
    mode: str = "last"  # one of POOLING_MODES
    normalize: bool = True  # L2

    def __str__(self) -> str:
        return f"{self.mode},normalized" if self.normalize else self.mode

    @classmethod
    def for_model(cls, model_dir: Path) -> Pooling:
        """The model's own pooling if it has a sentence-transformers config, else last-token
        with L2 normalisation."""
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():
            return cls()
        try:
            modules = json.loads(modules_file.read_text())
            types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
            mode = "last"
            if "Pooling" in types:
                config_file = model_dir / str(types["Pooling"].get("path", "")) / "config.json"
                config = json.loads(config_file.read_text())
                mode = next((m for key, m in _ST_MODES.items() if config.get(key)), None) or "last"
            return cls(mode, normalize="Normalize" in types)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("ignoring the unreadable sentence-transformers config: %s", exc)
            return cls()


def pool(hidden: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One prompt's hidden states [tokens, hidden] -> its embedding [hidden] (float32)."""
    if pooling.mode == "mean":
        vector = hidden.mean(dim=0)
    elif pooling.mode == "cls":
        vector = hidden[0]
    else:
        vector = hidden[-1]
    vector = vector.float()
    if pooling.normalize:
        vector = torch.nn.functional.normalize(vector, p=2.0, dim=0)
    return vector


def groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of the prompts, in order, in groups of at most max_tokens tokens (a longer
    prompt is a group of its own, computed in chunks)."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if out and total + n <= max_tokens:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def run_group(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    pooling: Pooling,
    allocate: Callable[[int], list[int]],
    chunk_size: int,
) -> list[torch.Tensor]:
    """Embeddings of prompts that fit one step together (or of one long prompt, in chunks
    of chunk_size tokens). Runs on the engine thread; `allocate(n)` gives n free pages."""
    pool_ = runner.pool
    pages: list[list[int]] = []
    try:
        for prompt in prompts:
            pages.append(allocate(pool_.pages_for(len(prompt))))
        if len(prompts) == 1 and len(prompts[0]) > chunk_size:
            prompt = list(prompts[0])
            parts = [
                runner.hidden_states([SeqSlice(prompt[at : at + chunk_size], at, pages[0])])
                for at in range(0, len(prompt), chunk_size)
            ]
            return [pool(torch.cat(parts), pooling)]
        slices = [SeqSlice(list(p), 0, pg) for p, pg in zip(prompts, pages, strict=True)]
        hidden = runner.hidden_states(slices)
        return [pool(rows, pooling) for rows in hidden.split([len(p) for p in prompts])]
    finally:
        for page_ids in pages:
            pool_.free(page_ids)


RunOnEngine = Callable[[Callable[[], list[torch.Tensor]]], "Future[list[torch.Tensor]]"]


async def serve(
    request: pb.EmbedRequest,
    context: grpc.aio.ServicerContext,
    runner: ModelRunner,
    run_on_engine: RunOnEngine,
    pooling: Pooling,
    allocate: Callable[[int], list[int]],
    max_tokens: int,
    chunk_size: int,
) -> pb.EmbedResponse:
    """The Embed call: one engine call per group of prompts, so that the engine's own
    steps go on between them."""
    prompts = [[int(t) for t in item.token_ids] for item in request.inputs]
    config = runner.config
    if not prompts or any(not p or len(p) > config.max_context for p in prompts):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"every input needs 1 to {config.max_context} tokens"
        )
    if any(t >= config.vocab_size for p in prompts for t in p):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id out of the vocabulary")
    vectors: list[list[float]] = [[] for _ in prompts]
    try:
        for group in groups([len(p) for p in prompts], max_tokens):
            call = partial(
                run_group, runner, [prompts[i] for i in group], pooling, allocate, chunk_size
            )
            result = await asyncio.wrap_future(run_on_engine(call))
            for i, vector in zip(group, result, strict=True):
                vectors[i] = vector.tolist()
    except KVPoolExhausted as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"KV pool full: {exc}")
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(values=v) for v in vectors],
        prompt_tokens=sum(len(p) for p in prompts),
        pooling=str(pooling),
    )
