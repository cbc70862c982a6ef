"""Groups of prompts sharing a long system prompt (like SGLang's generated-shared-prefix).

Each group has its own system prompt; each request is that prompt plus a question of its
own. Requests of all groups are shuffled together, so a router that keeps a group on the
worker holding its prefix is rewarded.
"""

from __future__ import annotations

import math

import numpy as np

from loadtest.datasets.base import Session, Turn
from loadtest.datasets.options import DatasetOptions
from loadtest.synthetic_text import random_text
from loadtest.tokens import TokenCounter


def shared_prefix_sessions(options: DatasetOptions, counter: TokenCounter,
                           rng: np.random.Generator) -> list[Session]:
    groups = options.gsp_num_groups
    per_group = options.gsp_prompts_per_group
    if options.num_prompts is not None:
        per_group = max(per_group, math.ceil(options.num_prompts / groups))
    sessions: list[Session] = []
    for group in range(groups):
        system = random_text(counter, options.gsp_system_prompt_len, rng)
        for _ in range(per_group):
            question = random_text(counter, options.gsp_question_len, rng)
            turn = Turn(question, options.gsp_output_len)
            sessions.append(Session(len(sessions), (turn,), system=system, group=group))
    order = rng.permutation(len(sessions))
    shuffled = [sessions[i] for i in order]
    return shuffled[: options.num_prompts] if options.num_prompts else shuffled
