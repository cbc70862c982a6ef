"""Workloads: exact token lengths, shared prefixes, conversations, ShareGPT files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from loadtest.client import EndpointConfig
from loadtest.datasets import DatasetOptions, Session, Turn, build_sessions
from loadtest.runner import build_prompt
from loadtest.synthetic_text import random_text
from loadtest.tokens import ApproxTokenCounter, HFTokenCounter, load_token_counter


@pytest.fixture(scope="module")
def counter(default_model_dir: Path) -> HFTokenCounter:
    return HFTokenCounter(AutoTokenizer.from_pretrained(default_model_dir), "default")


@pytest.mark.parametrize("length", [1, 7, 64, 500])
def test_random_text_has_the_exact_token_count(counter: HFTokenCounter, length: int) -> None:
    rng = np.random.default_rng(length)
    for _ in range(5):
        assert len(counter.encode(random_text(counter, length, rng))) == length


def test_random_dataset_lengths_follow_the_range_ratio(counter: HFTokenCounter) -> None:
    options = DatasetOptions(name="random", num_prompts=40, random_input_len=100,
                             random_output_len=20, random_range_ratio=0.5, seed=3)
    sessions = build_sessions(options, counter)
    assert len(sessions) == 40
    inputs = [len(counter.encode(s.turns[0].text)) for s in sessions]
    outputs = [s.turns[0].output_len for s in sessions]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 10
    assert min(outputs) >= 10 and max(outputs) <= 30
    # Same seed, same prompts (an A/B compares like with like); another point, others.
    assert build_sessions(options, counter) == sessions
    assert build_sessions(options, counter, seed_offset=1) != sessions


def test_shared_prefix_groups_share_their_system_prompt(counter: HFTokenCounter) -> None:
    options = DatasetOptions(name="shared-prefix", gsp_num_groups=3, gsp_prompts_per_group=5,
                             gsp_system_prompt_len=128, gsp_question_len=16, gsp_output_len=8)
    sessions = build_sessions(options, counter)
    assert len(sessions) == 15
    systems = {s.group: s.system for s in sessions}
    assert len(set(systems.values())) == 3
    assert all(s.system == systems[s.group] for s in sessions)
    assert all(len(counter.encode(s.system or "")) == 128 for s in sessions)
    assert [s.group for s in sessions] != sorted(s.group or 0 for s in sessions)  # interleaved
    capped = build_sessions(DatasetOptions(name="shared-prefix", num_prompts=40,
                                           gsp_num_groups=3, gsp_prompts_per_group=5), counter)
    assert len(capped) == 40


def test_multi_turn_counts_requests_not_conversations(counter: HFTokenCounter) -> None:
    options = DatasetOptions(name="multi-turn", num_prompts=10, mt_turns=4, mt_turn_len=12)
    sessions = build_sessions(options, counter)
    assert [len(s.turns) for s in sessions] == [4, 4, 2]
    assert all(len(counter.encode(t.text)) == 12 for s in sessions for t in s.turns)


def test_later_turns_carry_the_earlier_ones_as_prefix() -> None:
    session = Session(0, (Turn("first", 4), Turn("second", 4)), system="shared")
    chat = EndpointConfig("http://x", "m", "chat")
    messages = build_prompt(chat, session, [("first", "answer one")], session.turns[1])
    assert messages == [
        {"role": "system", "content": "shared"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "second"},
    ]
    text = EndpointConfig("http://x", "m", "completions")
    earlier = build_prompt(text, session, [], session.turns[0])
    later = build_prompt(text, session, [("first", "answer one")], session.turns[1])
    assert isinstance(earlier, str) and isinstance(later, str)
    assert later.startswith(earlier)


def _sharegpt(path: Path) -> Path:
    words = "the quick brown fox jumps over the lazy dog again and again"
    items = [
        {"id": f"c{i}", "conversations": [
            {"from": "system", "value": "ignored"},
            {"from": "human", "value": f"question {i} {words}"},
            {"from": "gpt", "value": f"answer {i} {words} {words}"},
            {"from": "human", "value": f"follow up {i} {words}"},
            {"from": "gpt", "value": f"second answer {i} {words}"},
        ]} for i in range(6)
    ]
    items.append({"id": "short", "conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "hello there"}]})
    path.write_text(json.dumps(items))
    return path


def test_sharegpt_single_and_multi_turn(counter: HFTokenCounter, tmp_path: Path) -> None:
    path = _sharegpt(tmp_path / "sg.json")
    single = build_sessions(DatasetOptions(name="sharegpt", dataset_path=path), counter)
    assert len(single) == 6  # the two-token prompt is dropped, as vLLM does
    assert all(len(s.turns) == 1 and s.source_id in {f"c{i}" for i in range(6)} for s in single)
    first = single[0]
    assert first.source_id is not None
    words = "the quick brown fox jumps over the lazy dog again and again"
    reply = f"answer {first.source_id[1:]} {words} {words}"  # the recorded answer's length
    assert first.turns[0].output_len == len(counter.encode(reply))
    multi = build_sessions(DatasetOptions(name="sharegpt", dataset_path=path, num_prompts=5,
                                          sharegpt_multi_turn=True, sharegpt_output_len=9),
                           counter)
    assert [len(s.turns) for s in multi] == [2, 2, 1]
    assert all(t.output_len == 9 for s in multi for t in s.turns)
    with pytest.raises(ValueError, match="dataset-path"):
        build_sessions(DatasetOptions(name="sharegpt"), counter)


def test_without_a_local_tokenizer_counts_are_approximate() -> None:
    counter = load_token_counter(None, "no-such-model-anywhere")
    assert isinstance(counter, ApproxTokenCounter) and not counter.exact
    text = random_text(counter, 50, np.random.default_rng(0))
    assert counter.count_completion_prompt(text) == 50
