"""The KV that a prefill worker relays equals what one process computes, bit for bit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.processes import ChildProcess, free_port, grpc_serving
from shared.kv_pool import KVPool
from shared.model.runner import ModelRunner, SeqSlice
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.transfer.zmq_transport import ZmqKvReceiver

pytestmark = pytest.mark.default_model

PROMPT_TOKENS = 333  # 21 pages of 16, the last one partial


@pytest.fixture(scope="module")
def prefill_worker(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("prefill") / "prefill.log"
    worker = ChildProcess.kvrelay(
        "prefill",
        ["prefill", "--port", str(port), "--model-path", str(default_model_dir),
         "--kv-cache-mb", "64", "--num-threads", "1"],
        log_path=log_path,
    ).start()
    try:
        worker.wait_ready(lambda: grpc_serving(f"127.0.0.1:{port}"), timeout_s=180)
        yield f"127.0.0.1:{port}"
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def local_runner(default_model_dir: Path) -> ModelRunner:
    # Same thread count as the worker: GEMM reduction order may depend on it.
    return ModelRunner(default_model_dir, kv_cache_mb=64, num_threads=1)


def _prompt(vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()


def test_relayed_pages_equal_single_process_kv(
    prefill_worker: str, local_runner: ModelRunner
) -> None:
    prompt = _prompt(local_runner.config.vocab_size)
    geometry = local_runner.pool.kv.shape
    # The decode side of the relay: a real pool and a real ZeroMQ receiver in this process.
    decode_pool = KVPool(geometry[0], geometry[4], geometry[5], num_pages=64,
                         page_size=geometry[3])
    receiver = ZmqKvReceiver(decode_pool, "127.0.0.1", 0, "127.0.0.1")
    try:
        # Reserved pages deliberately not at the start and not in order.
        decode_pool.allocate(5)
        reserved = list(reversed(decode_pool.allocate(decode_pool.pages_for(len(prompt)))))
        request_id = uuid.uuid4().hex
        arrival = receiver.expect(request_id, reserved)
        with grpc.insecure_channel(prefill_worker) as channel:
            response = pb_grpc.PrefillWorkerStub(channel).Prefill(
                pb.PrefillRequest(
                    request_id=request_id,
                    prompt_token_ids=prompt,
                    sampling=pb.SamplingParams(temperature=0, max_new_tokens=8),
                    kv_target=pb.KvTarget(endpoint=receiver.endpoint, page_ids=reserved),
                ),
                timeout=60,
            )
        result = arrival.result(timeout=30)
    finally:
        receiver.close()

    local_pages = local_runner.pool.allocate(local_runner.pool.pages_for(len(prompt)))
    try:
        logits = local_runner.forward([SeqSlice(prompt, 0, local_pages)])
        expected_kv = local_runner.pool.kv[:, :, local_pages].clone()
    finally:
        local_runner.pool.free(local_pages)

    assert result.num_tokens == len(prompt)
    assert result.first_token_ids == list(response.first_token_ids) == [int(logits[0].argmax())]
    page_size = geometry[3]
    relayed = decode_pool.kv[:, :, reserved].flatten(2, 3)[:, :, : len(prompt)]
    expected = expected_kv.flatten(2, 3)[:, :, : len(prompt)]
    assert torch.equal(relayed, expected)
    assert response.kv_bytes_sent == decode_pool.page_bytes() * len(reserved)
    assert len(reserved) * page_size >= len(prompt) > (len(reserved) - 1) * page_size


def test_transfer_to_unexpected_request_writes_nothing(prefill_worker: str) -> None:
    """A chunk for a request that decode does not expect never touches its pool."""
    pool = KVPool(30, 3, 64, num_pages=32, page_size=16)
    receiver = ZmqKvReceiver(pool, "127.0.0.1", 0, "127.0.0.1")
    try:
        with grpc.insecure_channel(prefill_worker) as channel:
            pb_grpc.PrefillWorkerStub(channel).Prefill(
                pb.PrefillRequest(
                    request_id="never-expected",
                    prompt_token_ids=list(range(10, 42)),
                    sampling=pb.SamplingParams(temperature=0, max_new_tokens=4),
                    kv_target=pb.KvTarget(endpoint=receiver.endpoint, page_ids=[0, 1]),
                ),
                timeout=60,
            )
        time.sleep(0.5)
        assert int(pool.kv.count_nonzero()) == 0
    finally:
        receiver.close()


def test_cancelled_expectation_fails_and_ignores_late_kv(prefill_worker: str) -> None:
    pool = KVPool(30, 3, 64, num_pages=32, page_size=16)
    receiver = ZmqKvReceiver(pool, "127.0.0.1", 0, "127.0.0.1")
    try:
        pages = pool.allocate(2)
        future = receiver.expect("cancelled", pages)
        receiver.cancel("cancelled")
        assert future.cancelled()
        with grpc.insecure_channel(prefill_worker) as channel:
            pb_grpc.PrefillWorkerStub(channel).Prefill(
                pb.PrefillRequest(
                    request_id="cancelled",
                    prompt_token_ids=list(range(10, 42)),
                    sampling=pb.SamplingParams(temperature=0, max_new_tokens=4),
                    kv_target=pb.KvTarget(endpoint=receiver.endpoint, page_ids=pages),
                ),
                timeout=60,
            )
        time.sleep(0.5)
        assert int(pool.kv.count_nonzero()) == 0
        assert receiver.num_expected == 0
    finally:
        receiver.close()


def test_prefill_to_unreachable_decode_fails_cleanly(prefill_worker: str) -> None:
    dead_endpoint = f"tcp://127.0.0.1:{free_port()}"
    with grpc.insecure_channel(prefill_worker) as channel:
        stub = pb_grpc.PrefillWorkerStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Prefill(
                pb.PrefillRequest(
                    request_id="to-nowhere",
                    prompt_token_ids=list(range(10, 42)),
                    sampling=pb.SamplingParams(temperature=0, max_new_tokens=4),
                    kv_target=pb.KvTarget(endpoint=dead_endpoint, page_ids=[0, 1]),
                ),
                timeout=60,
            )
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
        info = stub.GetInfo(pb.WorkerInfoRequest(), timeout=5)
    assert info.free_pages + info.cached_pages == info.num_pages

