"""ShareGPT-format JSON files the user supplies (nothing is downloaded).

The format: a list of {"id": ..., "conversations": [{"from": "human"|"gpt", "value": ...}]}.
Single-turn (as vLLM and SGLang do): the first human message, answered with as many tokens
as the recorded reply had. Multi-turn: every human message of the conversation in turn.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.datasets.base import Session, Turn
from loadtest.datasets.options import DatasetOptions
from loadtest.tokens import TokenCounter

DEFAULT_NUM_PROMPTS = 1000
MIN_TOKENS = 4  # vLLM drops shorter prompts and replies as noise
HUMAN = {"human", "user"}
ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "bing"}


def _exchanges(item: dict[str, Any]) -> list[tuple[str, str]]:
    """(human text, recorded reply) pairs, in order."""
    messages = item.get("conversations") or item.get("conversation") or []
    pairs = []
    for asked, answered in itertools.pairwise(messages):
        if asked.get("from") in HUMAN and answered.get("from") in ASSISTANT:
            pairs.append((str(asked.get("value", "")), str(answered.get("value", ""))))
    return pairs


def load_sharegpt(path: Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    return data


def sharegpt_sessions(options: DatasetOptions, counter: TokenCounter,
                      rng: np.random.Generator) -> list[Session]:
    if options.dataset_path is None:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    items = load_sharegpt(options.dataset_path)
    wanted = options.num_prompts or DEFAULT_NUM_PROMPTS
    sessions: list[Session] = []
    requests = 0
    for index in rng.permutation(len(items)):
        if requests >= wanted:
            break
        item = items[int(index)]
        pairs = _exchanges(item)
        if not options.sharegpt_multi_turn:
            pairs = pairs[:1]
        turns = []
        for prompt, reply in pairs:
            prompt_len = len(counter.encode(prompt))
            output_len = options.sharegpt_output_len or len(counter.encode(reply))
            if (prompt_len < MIN_TOKENS or output_len < MIN_TOKENS
                    or prompt_len + output_len > options.sharegpt_max_len):
                break
            turns.append(Turn(prompt, output_len))
        if turns:
            source = str(item.get("id", int(index)))
            sessions.append(Session(len(sessions), tuple(turns), source_id=source))
            requests += len(turns)
    if not sessions:
        raise ValueError(f"{options.dataset_path}: no usable conversations")
    return sessions
