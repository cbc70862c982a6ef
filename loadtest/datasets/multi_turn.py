"""Conversations: every turn is sent with the earlier turns (and their answers) as prefix."""

from __future__ import annotations

import math

import numpy as np

from loadtest.datasets.base import Session, Turn
from loadtest.datasets.options import DatasetOptions
from loadtest.synthetic_text import random_text, sample_lengths
from loadtest.tokens import TokenCounter

DEFAULT_CONVERSATIONS = 16


def multi_turn_sessions(options: DatasetOptions, counter: TokenCounter,
                        rng: np.random.Generator) -> list[Session]:
    turns = options.mt_turns
    conversations = (
        math.ceil(options.num_prompts / turns) if options.num_prompts else DEFAULT_CONVERSATIONS
    )
    sessions = []
    for index in range(conversations):
        inputs = sample_lengths(options.mt_turn_len, options.random_range_ratio, turns, rng)
        outputs = sample_lengths(options.random_output_len, options.random_range_ratio, turns,
                                 rng)
        sessions.append(Session(index, tuple(
            Turn(random_text(counter, n_in, rng), n_out)
            for n_in, n_out in zip(inputs, outputs, strict=True)
        )))
    return sessions
