"""Random prompt text of an exact token count (with an exact tokenizer)."""

from __future__ import annotations

import numpy as np

from loadtest.tokens import TokenCounter

MAX_FIX_ROUNDS = 8


def random_text(counter: TokenCounter, num_tokens: int, rng: np.random.Generator) -> str:
    """Text that encodes to `num_tokens` tokens (no special tokens).

    Random whole-word tokens, decoded, then re-encoded and trimmed or topped up until the
    round trip is stable: neighbouring words can merge into one token when re-encoded.
    """
    if num_tokens <= 0:
        return ""
    words = np.asarray(counter.word_ids())
    ids = [int(i) for i in rng.choice(words, size=num_tokens)]
    text = counter.decode(ids)
    for _ in range(MAX_FIX_ROUNDS):
        ids = counter.encode(text)
        if len(ids) == num_tokens:
            return text
        if len(ids) > num_tokens:
            ids = ids[:num_tokens]
        else:
            ids += [int(i) for i in rng.choice(words, size=num_tokens - len(ids))]
        text = counter.decode(ids)
    return text  # off by a token or two at worst; records carry the server's own count


def sample_lengths(
    mean: int, range_ratio: float, count: int, rng: np.random.Generator, minimum: int = 1
) -> list[int]:
    """Uniform integers in [mean*(1-r), mean*(1+r)] (vLLM's --random-range-ratio)."""
    low = max(minimum, round(mean * (1 - range_ratio)))
    high = max(low, round(mean * (1 + range_ratio)))
    return [int(n) for n in rng.integers(low, high + 1, size=count)]
