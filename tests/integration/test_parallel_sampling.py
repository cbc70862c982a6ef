"""Parallel sampling (`n` > 1) across real workers: one prefill, n decode sequences.

The oracle is a local loop over the same tiny checkpoint: choice i of a request must be,
token for token, the answer of the same request with n = 1 and choice i's parameters
(`SamplingParams.for_choice`). A wrong copy of the shared partial page, or choices
writing into each other's pages, changes the tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.model.runner import ModelRunner
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_to_pb
from shared.sampler import SamplingParams
from tests.cluster import Cluster, start_cluster
from tests.integration.test_sampling_e2e import prompt, reference
from tests.tiny_models import build_tiny_llama

RPC_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-parallel"), seed=3)


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        model_dir, tmp_path_factory.mktemp("parallel-cluster"), model_name="tiny-parallel",
        kv_cache_mb=16, worker_args=["--num-threads", "1"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, kv_cache_mb=16, num_threads=1)


def generate_choices(
    cluster: Cluster, prompt_ids: list[int], params: SamplingParams
) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Each choice's tokens and finish reason, straight from the workers."""
    request_id = uuid.uuid4().hex
    sampling = sampling_to_pb(params)
    answers: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    with grpc.insecure_channel(cluster.decode_addrs[0]) as decode_channel, \
            grpc.insecure_channel(cluster.prefill_addrs[0]) as prefill_channel:
        stream = pb_grpc.DecodeWorkerStub(decode_channel).Generate(
            pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                               sampling=sampling),
            timeout=RPC_TIMEOUT_S,
        )
        reserved = next(stream)
        assert reserved.WhichOneof("event") == "reserved"
        first = pb_grpc.PrefillWorkerStub(prefill_channel).Prefill(
            pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                              sampling=sampling, kv_target=reserved.reserved),
            timeout=RPC_TIMEOUT_S,
        )
        assert len(first.first_token_ids) == params.n
        for index, token in enumerate(first.first_token_ids):
            answers[index] = [token]
        for event in stream:  # the stream ends when every choice has finished
            batch = event.tokens
            assert batch.index not in reasons, "tokens after the choice finished"
            answers[batch.index].extend(batch.token_ids)
            if batch.finish_reason:
                reasons[batch.index] = batch.finish_reason
    assert sorted(reasons) == list(range(params.n))
    return answers, reasons


def free_pages(cluster: Cluster) -> tuple[int, int]:
    with grpc.insecure_channel(cluster.decode_addrs[0]) as channel:
        info = pb_grpc.DecodeWorkerStub(channel).GetInfo(pb.WorkerInfoRequest(), timeout=5)
    return info.free_pages, info.num_pages


@pytest.mark.parametrize("prompt_len", [21, 32])  # a partial last page; whole pages only
def test_each_choice_equals_its_request_alone(
    cluster: Cluster, runner: ModelRunner, prompt_len: int
) -> None:
    prompt_ids = prompt(100 + prompt_len, prompt_len)
    params = SamplingParams(temperature=1.0, top_k=50, seed=11, max_new_tokens=12, n=4)
    answers, reasons = generate_choices(cluster, prompt_ids, params)
    expected = [reference(runner, prompt_ids, params.for_choice(i)) for i in range(4)]
    assert [answers[i] for i in range(4)] == expected
    assert set(reasons.values()) == {"length"}
    assert len({tuple(a) for a in expected}) > 1, "the choices should differ"
    free, total = free_pages(cluster)
    assert free == total


def test_greedy_choices_are_all_the_greedy_answer(cluster: Cluster, runner: ModelRunner) -> None:
    prompt_ids = prompt(7, 19)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, n=3)
    answers, _ = generate_choices(cluster, prompt_ids, params)
    greedy = reference(runner, prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=10))
    assert [answers[i] for i in range(3)] == [greedy] * 3


def test_a_choice_that_stops_early_leaves_the_others_running(
    cluster: Cluster, runner: ModelRunner
) -> None:
    prompt_ids = prompt(8, 27)
    base = SamplingParams(temperature=1.0, seed=5, max_new_tokens=10, n=3)
    free_run = [reference(runner, prompt_ids, base.for_choice(i)) for i in range(3)]
    stop = free_run[1][0]  # choice 1 ends on its very first token (sampled by prefill)
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=10, n=3,
                            stop_token_ids=(stop,))
    answers, reasons = generate_choices(cluster, prompt_ids, params)
    for i in range(3):
        full = free_run[i]
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert answers[i] == full[:cut]
        assert reasons[i] == ("stop" if stop in full else "length")
    assert reasons[1] == "stop" and answers[1] == [stop]
    free, total = free_pages(cluster)
    assert free == total


def test_cancelling_frees_every_choice(cluster: Cluster) -> None:
    prompt_ids = prompt(9, 40)
    params = SamplingParams(temperature=1.0, max_new_tokens=200, n=5)
    request_id = uuid.uuid4().hex
    sampling = sampling_to_pb(params)
    with grpc.insecure_channel(cluster.decode_addrs[0]) as decode_channel, \
            grpc.insecure_channel(cluster.prefill_addrs[0]) as prefill_channel:
        stream = pb_grpc.DecodeWorkerStub(decode_channel).Generate(
            pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                               sampling=sampling),
            timeout=RPC_TIMEOUT_S,
        )
        reserved = next(stream)
        pb_grpc.PrefillWorkerStub(prefill_channel).Prefill(
            pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                              sampling=sampling, kv_target=reserved.reserved),
            timeout=RPC_TIMEOUT_S,
        )
        next(stream)  # decoding has started
        stream.cancel()
    for _ in range(50):
        free, total = free_pages(cluster)
        if free == total:
            break
        time.sleep(0.1)
    assert free == total


# Through the OpenAI API: n choices in one response, each equal to its request alone.


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


def test_chat_choices_equal_their_requests_alone(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count on."}]
    seed = 1234
    response = client.chat.completions.create(
        model="tiny-parallel", messages=messages, n=3, seed=seed, temperature=1.0,
        max_tokens=10,
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    params = SamplingParams(temperature=1.0, seed=seed, n=3)
    alone = [
        client.chat.completions.create(
            model="tiny-parallel", messages=messages, seed=params.for_choice(i).seed,
            temperature=1.0, max_tokens=10,
        )
        for i in range(3)
    ]
    assert [c.message.content for c in response.choices] == [
        a.choices[0].message.content for a in alone
    ]
    assert [c.finish_reason for c in response.choices] == [
        a.choices[0].finish_reason for a in alone
    ]
    assert response.usage is not None
    assert response.usage.completion_tokens == sum(
        a.usage.completion_tokens for a in alone if a.usage is not None
    )
    assert response.usage.prompt_tokens == alone[0].usage.prompt_tokens  # type: ignore[union-attr]


def test_streamed_choices_equal_the_whole_response(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="tiny-parallel", prompt="Once upon a time", n=4, seed=99, temperature=1.0,
        max_tokens=12,
    )
    whole = client.completions.create(**kwargs)
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            assert not chunk.choices  # the usage chunk comes last, alone
            usage = chunk.usage
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in whole.choices]
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.text for c in whole.choices}) > 1


def test_n_out_of_range_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model="tiny-parallel", prompt="x", n=129, max_tokens=2)
    assert "n" in str(excinfo.value)


def test_streamed_chat_choices_equal_the_whole_response(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Go."}]
    kwargs: dict[str, Any] = dict(
        model="tiny-parallel", messages=messages, n=3, seed=5, temperature=1.0, max_tokens=9
    )
    whole = client.chat.completions.create(**kwargs)
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
