"""Workloads, built before the clock starts: `build_sessions(options, counter)`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loadtest.datasets.base import Session, Turn, take_requests
from loadtest.datasets.multi_turn import multi_turn_sessions
from loadtest.datasets.options import DatasetOptions
from loadtest.datasets.random_prompts import random_sessions
from loadtest.datasets.shared_prefix import shared_prefix_sessions
from loadtest.datasets.sharegpt import sharegpt_sessions
from loadtest.tokens import TokenCounter

__all__ = ["DATASETS", "DatasetOptions", "Session", "Turn", "build_sessions"]

Builder = Callable[[DatasetOptions, TokenCounter, np.random.Generator], list[Session]]
DATASETS: dict[str, Builder] = {
    "random": random_sessions,
    "shared-prefix": shared_prefix_sessions,
    "multi-turn": multi_turn_sessions,
    "sharegpt": sharegpt_sessions,
}


def build_sessions(options: DatasetOptions, counter: TokenCounter,
                   seed_offset: int = 0) -> list[Session]:
    """The sessions of one load point; `num_prompts` (if set) counts requests, not sessions."""
    rng = np.random.default_rng(options.seed + seed_offset)
    sessions = DATASETS[options.name](options, counter, rng)
    return take_requests(sessions, options.num_prompts) if options.num_prompts else sessions
