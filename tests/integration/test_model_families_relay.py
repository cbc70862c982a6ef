"""Each architecture served through a real prefill -> decode relay answers as transformers.

One tiny random checkpoint per family; its prefill and decode workers are separate
processes (gRPC control, KV over ZeroMQ). All families' workers start together, so the
file pays for process start-up once. The greedy answer and every token's logprob (the
first from prefill, the rest from decode) must match HF run on the whole sequence.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.processes import ChildProcess, free_port, grpc_serving
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from tests.tiny_models import build_tiny_model

PROMPT_TOKENS = 41  # longer than the sliding windows below, and not a whole page
ANSWER_TOKENS = 8
RPC_TIMEOUT_S = 60
VOCAB = 49152

# family -> build_tiny_model arguments: each family's own feature switched on.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 100000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "mistral": {"sliding_window": 20, "tie_word_embeddings": False},
    "qwen2": {
        "use_sliding_window": True,
        "sliding_window": 24,
        "max_window_layers": 1,
        "max_shard_size": "200KB",
    },
    "qwen3": {"head_dim": 32, "tie_word_embeddings": False},
    "qwen3_moe": {"tie_word_embeddings": False, "mlp_only_layers": [1], "num_layers": 3},
}


@dataclass
class Relay:
    model_dir: Path
    prefill_addr: str
    decode_addr: str


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Relay]]:
    root = tmp_path_factory.mktemp("families")
    processes: list[ChildProcess] = []
    relays: dict[str, Relay] = {}
    try:
        for seed, (family, build) in enumerate(FAMILIES.items()):
            model_dir = build_tiny_model(
                family, root / family, seed=seed, with_tokenizer=False, **build
            )
            addrs = []
            for role in ("prefill", "decode"):
                port = free_port()
                processes.append(
                    ChildProcess.kvrelay(
                        f"{family}-{role}",
                        [
                            role,
                            "--port",
                            str(port),
                            "--model-path",
                            str(model_dir),
                            "--kv-cache-mb",
                            "4",
                            "--num-threads",
                            "1",
                        ],
                        log_path=root / f"{family}-{role}.log",
                    ).start()
                )
                addrs.append(f"127.0.0.1:{port}")
            relays[family] = Relay(model_dir, addrs[0], addrs[1])
        for process, relay_addr in zip(
            processes,
            [a for r in relays.values() for a in (r.prefill_addr, r.decode_addr)],
            strict=True,
        ):
            process.wait_ready(partial(grpc_serving, relay_addr), timeout_s=120)
        yield relays
    finally:
        # Each stop waits for its own pid to exit: in parallel, teardown takes one wait.
        with ThreadPoolExecutor(max(len(processes), 1)) as pool:
            list(pool.map(ChildProcess.stop, processes))


def relay_greedy(relay: Relay, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """One greedy request as the gateway makes it: decode reserves pages, prefill fills
    them and samples the first token, decode streams the rest. No stop ids: full length."""
    request_id = uuid.uuid4().hex
    sampling = pb.SamplingParams(temperature=0, max_new_tokens=ANSWER_TOKENS)
    with (
        grpc.insecure_channel(relay.decode_addr) as decode_channel,
        grpc.insecure_channel(relay.prefill_addr) as prefill_channel,
    ):
        stream = pb_grpc.DecodeWorkerStub(decode_channel).Generate(
            pb.GenerateRequest(
                request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling
            ),
            timeout=RPC_TIMEOUT_S,
        )
        try:
            reserved = next(stream)
            assert reserved.WhichOneof("event") == "reserved"
            first = pb_grpc.PrefillWorkerStub(prefill_channel).Prefill(
                pb.PrefillRequest(
                    request_id=request_id,
                    prompt_token_ids=prompt_ids,
                    sampling=sampling,
                    kv_target=reserved.reserved,
                ),
                timeout=RPC_TIMEOUT_S,
            )
            tokens, logprobs = [first.first_token_ids[0]], [first.first_token_logprobs[0]]
            for event in stream:
                tokens.extend(event.tokens.token_ids)
                logprobs.extend(event.tokens.logprobs)
                if event.tokens.finish_reason:
                    break
        finally:
            stream.cancel()
    return list(tokens), list(logprobs)


@torch.inference_mode()
def hf_greedy(model_dir: Path, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """HF's greedy answer, each step over the whole sequence (no cache), with logprobs."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(ANSWER_TOKENS):
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        token = int(logp.argmax())
        tokens.append(token)
        logprobs.append(float(logp[token]))
        ids.append(token)
    return tokens, logprobs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_relay_answers_as_transformers(relays: dict[str, Relay], family: str) -> None:
    relay = relays[family]
    generator = torch.Generator().manual_seed(100)
    prompt_ids = torch.randint(3, VOCAB, (PROMPT_TOKENS,), generator=generator).tolist()
    tokens, logprobs = relay_greedy(relay, prompt_ids)
    ref_tokens, ref_logprobs = hf_greedy(relay.model_dir, prompt_ids)
    assert tokens == ref_tokens
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=0
    )
