"""Sampling parameters end to end: gateway -> prefill (first token) -> decode (the rest).

A tiny random Llama served by real processes. The oracle is a local loop over the same
checkpoint (ModelRunner, one token at a time) sampling with shared.sampler exactly as the
workers should: the answer of the cluster, token for token, must be the loop's.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from openai.types import Completion
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.model.runner import ModelRunner, SeqSlice
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_to_pb
from shared.sampler import SamplingParams, TokenHistory, sample
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-sampling"
EOS = 2  # build_tiny_llama's
RPC_TIMEOUT_S = 10.0  # a tiny model answers in milliseconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-sampling"))


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        model_dir, tmp_path_factory.mktemp("sampling-cluster"), model_name=MODEL,
        kv_cache_mb=16, worker_args=["--num-threads", "1"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    # One thread, as the workers: the GEMMs' reduction order may depend on it.
    return ModelRunner(model_dir, kv_cache_mb=16, num_threads=1)


def prompt(seed: int, count: int = 24) -> list[int]:
    """Token ids of a fresh prompt: no prefix-cache hit from another test."""
    rng = random.Random(seed)
    return [rng.randrange(3, 49000) for _ in range(count)]


def reference(
    runner: ModelRunner, prompt_ids: list[int], params: SamplingParams
) -> list[int]:
    """The answer the cluster must give: prefill, then one token per step, no stop ids."""
    pool = runner.pool
    pages = pool.allocate(pool.pages_for(len(prompt_ids) + params.max_new_tokens))
    try:
        logits = runner.forward([SeqSlice(prompt_ids, 0, pages)])
        answer: list[int] = []
        while True:
            tokens, _ = sample(logits, [params], [len(answer)],
                               histories=[TokenHistory(prompt_ids, answer)])
            answer.append(tokens[0])
            if len(answer) == params.max_new_tokens:
                return answer
            position = len(prompt_ids) + len(answer) - 1
            logits = runner.forward([SeqSlice([tokens[0]], position, pages)])
    finally:
        pool.free(pages)


def generate_ids(cluster: Cluster, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """One request straight to the workers, as the gateway makes it: decode reserves pages,
    prefill fills them and samples the first token, decode streams the rest."""
    request_id = uuid.uuid4().hex
    sampling = sampling_to_pb(params)
    with grpc.insecure_channel(cluster.decode_addrs[0]) as decode_channel, \
            grpc.insecure_channel(cluster.prefill_addrs[0]) as prefill_channel:
        stream = pb_grpc.DecodeWorkerStub(decode_channel).Generate(
            pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                               sampling=sampling),
            timeout=RPC_TIMEOUT_S,
        )
        try:
            reserved = next(stream)
            assert reserved.WhichOneof("event") == "reserved"
            first = pb_grpc.PrefillWorkerStub(prefill_channel).Prefill(
                pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                  sampling=sampling, kv_target=reserved.reserved),
                timeout=RPC_TIMEOUT_S,
            )
            answer = list(first.first_token_ids)
            for event in stream:
                answer.extend(event.tokens.token_ids)
                if event.tokens.finish_reason:
                    break
        finally:
            stream.cancel()
    return answer


def complete(client: openai.OpenAI, prompt_ids: list[int], max_tokens: int,
             **fields: object) -> Completion:
    # ignore_eos: a random model says EOS whenever it likes. Every field goes in the JSON
    # body as it is (extra_body), the SDK's own ones as well.
    return client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=max_tokens,
        extra_body={"ignore_eos": True, **fields},
    )


def test_seeded_answers_repeat_and_continue_one_stream(
    cluster: Cluster, client: openai.OpenAI, runner: ModelRunner
) -> None:
    ids = prompt(1)
    fields = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}
    first = complete(client, ids, 16, **fields)
    again = complete(client, ids, 16, **fields)
    other = complete(client, ids, 16, **{**fields, "seed": 99})
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text != other.choices[0].text
    assert first.usage is not None and first.usage.completion_tokens == 16
    # Token for token the local loop's: token 0 drawn on prefill, 1.. on decode, one seed.
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=16)
    ids = prompt(2)
    assert generate_ids(cluster, ids, params) == reference(runner, ids, params)
    cluster.wait_all_pages_free()


def test_logit_bias_forces_a_token(
    cluster: Cluster, client: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    (word,) = tokenizer(" river", add_special_tokens=False)["input_ids"]
    for fields in ({"temperature": 0.0}, {"temperature": 1.5, "seed": 3}):
        reply = complete(client, prompt(3), 6, logit_bias={str(word): 100}, **fields)
        assert reply.choices[0].text == " river" * 6
        assert reply.usage is not None and reply.usage.completion_tokens == 6
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a body of water."}],
        max_tokens=3, temperature=0.8, logit_bias={str(word): 100},
    )
    assert chat.choices[0].message.content == " river" * 3
    cluster.wait_all_pages_free()


def test_logit_bias_blocks_a_token(cluster: Cluster, runner: ModelRunner) -> None:
    ids = prompt(4)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    plain = generate_ids(cluster, ids, greedy)
    assert plain == reference(runner, ids, greedy)
    blocked = SamplingParams(temperature=0.0, max_new_tokens=8,
                             logit_bias=((plain[0], -100.0),))
    answer = generate_ids(cluster, ids, blocked)
    assert plain[0] not in answer
    assert answer == reference(runner, ids, blocked)
    cluster.wait_all_pages_free()


def test_min_tokens_holds_back_the_stop_token(client: openai.OpenAI, cluster: Cluster) -> None:
    eos_first = {"temperature": 0.0, "logit_bias": {str(EOS): 100}, "ignore_eos": False}
    reply = complete(client, prompt(5), 10, **eos_first)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 1
    reply = complete(client, prompt(5), 10, min_tokens=3, **eos_first)
    # Three tokens that may not be EOS, then EOS (which the usage counts).
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    cluster.wait_all_pages_free()


def test_penalties_apply_on_both_workers(
    cluster: Cluster, client: openai.OpenAI, runner: ModelRunner,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    (river,) = tokenizer(" river", add_special_tokens=False)["input_ids"]
    (lake,) = tokenizer(" lake", add_special_tokens=False)["input_ids"]
    # Two words far ahead of every other token, so that penalties of a few units decide
    # between them; " river" is in the prompt.
    ids = [*prompt(6), river]
    bias = ((river, 100.0), (lake, 100.0))
    plain = SamplingParams(temperature=0.0, max_new_tokens=12, logit_bias=bias)
    penalties = {"repetition_penalty": 1.5, "frequency_penalty": 1.0, "presence_penalty": 1.0}
    penalised = SamplingParams(temperature=0.0, max_new_tokens=12, logit_bias=bias,
                               repetition_penalty=1.5, frequency_penalty=1.0,
                               presence_penalty=1.0)
    expected = reference(runner, ids, penalised)
    # Token 0, on prefill: " river" was seen in the prompt, (100 + x) / 1.5 loses.
    assert expected[0] == lake
    assert expected != reference(runner, ids, plain)
    # Then decode: all three penalties over the answer so far.
    assert generate_ids(cluster, ids, penalised) == expected
    reply = complete(client, ids, 12, temperature=0.0,
                     logit_bias={str(river): 100, str(lake): 100}, **penalties)
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    cluster.wait_all_pages_free()
