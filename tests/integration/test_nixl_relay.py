"""KV relayed over NIXL (UCX on loopback, DRAM) between real worker processes.

Prefill and decode workers run with `--kv-transport nixl`: decode reads prefill's pages.
The relay must answer as transformers does, move the KV bit for bit, and give every page
back on both sides when the peer is killed in the middle of a transfer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import openai
import pytest
import torch
from transformers import AutoTokenizer

from services.processes import ChildProcess, free_port, grpc_serving
from shared.kv_pool import KVPool
from shared.model.config import ModelConfig
from shared.model.runner import ModelRunner, SeqSlice
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.transfer import KvTransferError
from shared.transfer.nixl_transport import NixlKvReceiver, NixlKvSender
from tests.cluster import start_cluster
from tests.integration.test_model_families_relay import Relay, hf_greedy, relay_greedy
from tests.tiny_models import build_tiny_llama, build_tiny_model

VOCAB = 49152
# Wider than the families' tiny models: a long prompt's prefill takes long enough to be cut.
MODEL = {"num_layers": 6, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 4}


@pytest.fixture(scope="module", autouse=True)
def loopback_ucx() -> Iterator[None]:
    """UCX stays on loopback, here and in every worker started meanwhile."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UCX_NET_DEVICES", "lo")
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        "llama", tmp_path_factory.mktemp("nixl-model"), seed=11, with_tokenizer=False, **MODEL
    )


def start_worker(
    role: str, model_dir: Path, log_dir: Path, *extra: str, name: str | None = None
) -> tuple[ChildProcess, str]:
    port = free_port()
    worker = ChildProcess.kvrelay(
        name or role,
        [
            role,
            "--port",
            str(port),
            "--model-path",
            str(model_dir),
            "--kv-cache-mb",
            "16",
            "--num-threads",
            "1",
            "--kv-transport",
            "nixl",
            *extra,
        ],
        log_path=log_dir / f"{name or role}.log",
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        worker.wait_ready(partial(grpc_serving, address), timeout_s=120)
    except BaseException:
        worker.stop()
        raise
    return worker, address


@pytest.fixture(scope="module")
def relay(
    model_dir: Path, loopback_ucx: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    log_dir = tmp_path_factory.mktemp("nixl-relay")
    prefill, prefill_addr = start_worker("prefill", model_dir, log_dir)
    try:
        decode, decode_addr = start_worker("decode", model_dir, log_dir)
        try:
            yield Relay(model_dir, prefill_addr, decode_addr)
        finally:
            decode.stop()
    finally:
        prefill.stop()


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=generator).tolist()


def free_pages(address: str, role: str) -> tuple[int, int]:
    """(pages free or only cached, pages in all) of a worker's KV pool."""
    with grpc.insecure_channel(address) as channel:
        stub: pb_grpc.PrefillWorkerStub | pb_grpc.DecodeWorkerStub = (
            pb_grpc.PrefillWorkerStub(channel)
            if role == "prefill"
            else pb_grpc.DecodeWorkerStub(channel)
        )
        info = stub.GetInfo(pb.WorkerInfoRequest(), timeout=5)
    return info.free_pages + info.cached_pages, info.num_pages


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def test_greedy_answer_through_a_nixl_relay_equals_transformers(relay: Relay) -> None:
    for length, seed in ((41, 1), (300, 2)):  # a partial page; many pages
        prompt = random_prompt(length, seed)
        tokens, logprobs = relay_greedy(relay, prompt)
        ref_tokens, ref_logprobs = hf_greedy(relay.model_dir, prompt)
        assert tokens == ref_tokens
        torch.testing.assert_close(
            torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=0
        )
    for address, role in ((relay.prefill_addr, "prefill"), (relay.decode_addr, "decode")):
        assert wait_until(lambda a=address, r=role: len(set(free_pages(a, r))) == 1, 10)


def test_openai_completion_through_a_nixl_cluster_equals_one_process(tmp_path: Path) -> None:
    """`--kv-transport nixl` end to end: gateway, prefill and decode processes."""
    model = build_tiny_llama(tmp_path / "tiny")
    prompt = random_prompt(90, 6)
    runner = ModelRunner(model, kv_cache_mb=8, num_threads=1)
    pages = runner.pool.allocate(runner.pool.pages_for(len(prompt) + 12))
    expected, logits = [], runner.forward([SeqSlice(prompt, 0, pages)])
    for step in range(12):
        expected.append(int(logits[0].argmax()))
        logits = runner.forward([SeqSlice([expected[-1]], len(prompt) + step, pages)])
    cluster = start_cluster(
        model, tmp_path / "logs", worker_args=["--kv-transport", "nixl", "--num-threads", "1"]
    )
    try:
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(
            model="test-model",
            prompt=prompt,
            temperature=0,
            max_tokens=12,
            extra_body={"ignore_eos": True},
        )
        tokenizer = AutoTokenizer.from_pretrained(model)
        assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        cluster.wait_all_pages_free()
    finally:
        cluster.stop()


def test_relayed_pages_equal_single_process_kv(relay: Relay) -> None:
    prompt = random_prompt(333, 3)  # 21 pages, the last one partial
    local = ModelRunner(relay.model_dir, kv_cache_mb=16, num_threads=1)
    geometry = local.pool.kv.shape
    decode_pool = KVPool(geometry[0], geometry[4], geometry[5], num_pages=64, page_size=16)
    receiver = NixlKvReceiver(decode_pool, "127.0.0.1", 0, "127.0.0.1")
    try:
        decode_pool.allocate(5)
        reserved = list(reversed(decode_pool.allocate(decode_pool.pages_for(len(prompt)))))
        request_id = uuid.uuid4().hex
        arrival = receiver.expect(request_id, reserved)
        with grpc.insecure_channel(relay.prefill_addr) as channel:
            response = pb_grpc.PrefillWorkerStub(channel).Prefill(
                pb.PrefillRequest(
                    request_id=request_id,
                    prompt_token_ids=prompt,
                    sampling=pb.SamplingParams(temperature=0, max_new_tokens=4),
                    kv_target=pb.KvTarget(
                        endpoint=receiver.endpoint, page_ids=reserved, transport="nixl"
                    ),
                ),
                timeout=60,
            )
        result = arrival.result(timeout=30)
    finally:
        receiver.close()
    pages = local.pool.allocate(local.pool.pages_for(len(prompt)))
    logits = local.forward([SeqSlice(prompt, 0, pages)])
    assert result.first_token_ids == list(response.first_token_ids) == [int(logits[0].argmax())]
    relayed = decode_pool.kv[:, :, reserved].flatten(2, 3)[:, :, : len(prompt)]
    expected = local.pool.kv[:, :, pages].flatten(2, 3)[:, :, : len(prompt)]
    assert torch.equal(relayed, expected)
    assert response.kv_bytes_sent == decode_pool.page_bytes() * len(reserved)


def test_prefill_rejects_a_target_of_another_transport(relay: Relay) -> None:
    with grpc.insecure_channel(relay.prefill_addr) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.PrefillWorkerStub(channel).Prefill(
            pb.PrefillRequest(
                request_id="zmq-target",
                prompt_token_ids=[5, 6, 7],
                sampling=pb.SamplingParams(temperature=0, max_new_tokens=2),
                kv_target=pb.KvTarget(endpoint="tcp://127.0.0.1:1", page_ids=[0], transport="zmq"),
            ),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_decode_frees_pages_when_prefill_dies_mid_transfer(model_dir: Path, tmp_path: Path) -> None:
    # One page per prefill step: the KV trickles in while the prompt is computed.
    prefill, address = start_worker(
        "prefill",
        model_dir,
        tmp_path,
        "--chunked-prefill-size",
        "16",
        "--max-prefill-tokens",
        "16",
        name="doomed-prefill",
    )
    geometry = pool_geometry(model_dir)
    decode_pool = KVPool(*geometry, num_pages=128, page_size=16)
    receiver = NixlKvReceiver(decode_pool, "127.0.0.1", 0, "127.0.0.1")
    prompt = random_prompt(1900, 4)  # about 120 prefill steps
    reserved = decode_pool.allocate(decode_pool.pages_for(len(prompt)))
    decode_pool.kv[:, :, reserved] = 0
    request_id = uuid.uuid4().hex
    arrival = receiver.expect(request_id, reserved)
    try:
        caller = threading.Thread(
            target=call_prefill,
            args=(address, request_id, prompt, receiver.endpoint, reserved),
            daemon=True,
        )
        caller.start()
        # Some pages have landed, the last has not: kill prefill in the middle.
        assert wait_until(lambda: bool(decode_pool.kv[:, :, reserved[2]].any()), 60, 0.001)
        os.kill(prefill.pid, signal.SIGKILL)
        assert not decode_pool.kv[:, :, reserved[-1]].any(), "prefill finished before the kill"
        time.sleep(1.0)
        # A read cut by the kill fails the request at once; otherwise no KvDone will ever
        # come, and the decode service's KV timeout cancels. Never an arrival.
        if arrival.done():
            with pytest.raises(KvTransferError):
                arrival.result()
        receiver.cancel(request_id)
        decode_pool.free(reserved)
        assert wait_until(lambda: decode_pool.num_free == decode_pool.num_pages, 10)
        assert receiver.num_reads == 0
    finally:
        receiver.close()
        prefill.stop()


def test_prefill_frees_pages_when_decode_dies_mid_transfer(model_dir: Path, tmp_path: Path) -> None:
    decode, decode_addr = start_worker("decode", model_dir, tmp_path, name="doomed-decode")
    geometry = pool_geometry(model_dir)
    prefill_pool = KVPool(*geometry, num_pages=128, page_size=16)
    prompt = random_prompt(700, 5)
    sender = NixlKvSender(prefill_pool, "test-prefill", send_timeout_s=1.0, hold_timeout_s=2.0)
    channel = grpc.insecure_channel(decode_addr)
    try:
        stream = pb_grpc.DecodeWorkerStub(channel).Generate(
            pb.GenerateRequest(
                request_id="orphan",
                prompt_token_ids=prompt,
                sampling=pb.SamplingParams(temperature=0, max_new_tokens=4),
            ),
            timeout=60,
        )
        target = next(stream).reserved
        assert target.transport == "nixl"
        dst = list(target.page_ids)
        src = prefill_pool.allocate(len(dst))
        sender.send_pages(
            request_id="orphan",
            endpoint=target.endpoint,
            pool=prefill_pool,
            src_page_ids=src[:20],
            dst_page_ids=dst[:20],
        )
        os.kill(decode.pid, signal.SIGKILL)
        decode.stop()
        with pytest.raises(KvTransferError):
            for _ in range(50):  # the connection's loss reaches ZeroMQ within a few sends
                sender.send_pages(
                    request_id="orphan",
                    endpoint=target.endpoint,
                    pool=prefill_pool,
                    src_page_ids=src[20:],
                    dst_page_ids=dst[20:],
                )
                time.sleep(0.05)
        prefill_pool.free(src)  # the engine's reference; the sender's held ones time out
        assert wait_until(lambda: prefill_pool.num_free == prefill_pool.num_pages, 10)
        assert sender.num_held == 0
    finally:
        channel.close()
        sender.close()
        decode.stop()


def call_prefill(
    address: str, request_id: str, prompt: list[int], endpoint: str, pages: list[int]
) -> None:
    # The worker is killed under this call: its error is expected.
    with grpc.insecure_channel(address) as channel, contextlib.suppress(grpc.RpcError):
        pb_grpc.PrefillWorkerStub(channel).Prefill(
            pb.PrefillRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=pb.SamplingParams(temperature=0, max_new_tokens=4),
                kv_target=pb.KvTarget(endpoint=endpoint, page_ids=pages, transport="nixl"),
            ),
            timeout=120,
        )


def pool_geometry(model_dir: Path) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a checkpoint, for KV pools that match it."""
    config = ModelConfig.from_dir(model_dir)
    return config.num_layers, config.num_kv_heads, config.head_dim
