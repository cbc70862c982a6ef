"""Token sampling: greedy, temperature, top-k, top-p, with per-token reproducible seeds.

With a seed, the random draw for answer token k depends only on (seed, k), so the prefill
worker (token 0) and the decode worker (tokens 1..) continue one reproducible stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0 disables
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def draw_seed(seed: int, output_index: int) -> int:
    """Generator seed for answer token `output_index`; stable across processes and runs."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], output_index: Sequence[int]
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [batch, vocab].

    Returns the token ids and each chosen token's logprob under the unmodified
    log_softmax (before temperature/top-k/top-p).
    """
    if not len(params) == len(output_index) == logits.shape[0]:
        raise ValueError("logits, params and output_index must have the same length")
    # Sample on CPU in float32: draws must not depend on the device the model ran on.
    logits = logits.detach().float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            tokens[i] = _sample_row(logits[i], p, output_index[i])
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1))
    return tokens, chosen.squeeze(1).tolist()


def _sample_row(row: torch.Tensor, p: SamplingParams, index: int) -> int:
    scaled = row / p.temperature
    if 0 < p.top_k < scaled.shape[0]:
        # topk returns the k best already sorted, so no full-vocab sort is needed.
        vals, ids = torch.topk(scaled, p.top_k)
    elif p.top_p < 1:
        vals, ids = torch.sort(scaled, descending=True)
    else:
        vals, ids = scaled, None
    probs = torch.softmax(vals, dim=-1)
    if p.top_p < 1:
        # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
        before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(before < p.top_p, probs, torch.zeros_like(probs))
    choice = _inverse_cdf(probs.double(), _uniform(p.seed, index))
    return int(choice if ids is None else ids[choice])


def _uniform(seed: int | None, index: int) -> float:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh nondeterministic state
    else:
        gen.manual_seed(draw_seed(seed, index))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _inverse_cdf(probs: torch.Tensor, u: float) -> int:
    # One uniform and a searchsorted: unlike torch.multinomial, the mapping from the
    # uniform to the token is the same on every device and torch version.
    cdf = torch.cumsum(probs, dim=0)
    j = int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True))
    if j >= probs.shape[0]:  # u * total rounded up to total: take the last non-zero token
        j = int(torch.nonzero(probs).max())
    return j
