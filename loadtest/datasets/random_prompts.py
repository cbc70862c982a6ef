"""Random prompts with input and output lengths drawn around the given means."""

from __future__ import annotations

import numpy as np

from loadtest.datasets.base import Session, Turn
from loadtest.datasets.options import DatasetOptions
from loadtest.synthetic_text import random_text, sample_lengths
from loadtest.tokens import TokenCounter

DEFAULT_NUM_PROMPTS = 100


def random_sessions(options: DatasetOptions, counter: TokenCounter,
                    rng: np.random.Generator) -> list[Session]:
    count = options.num_prompts or DEFAULT_NUM_PROMPTS
    inputs = sample_lengths(options.random_input_len, options.random_range_ratio, count, rng)
    outputs = sample_lengths(options.random_output_len, options.random_range_ratio, count, rng)
    return [
        Session(i, (Turn(random_text(counter, n_in, rng), n_out),))
        for i, (n_in, n_out) in enumerate(zip(inputs, outputs, strict=True))
    ]
