"""Nobody waits forever: both ends of the KV relay give up on a peer that never comes.

Real worker processes (tiny model), called over gRPC directly so that the gateway's own
cancellation is out of the picture. Decode frees the pages it reserved when their KV does
not arrive within --kv-timeout-s; prefill fails a request whose decode worker does not
take its KV within --kv-send-timeout-s, frees its pages, and gives up on the same dead
endpoint at once for the next request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from services.processes import free_port
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_to_pb
from shared.sampler import SamplingParams
from tests.cluster import Cluster, start_cluster
from tests.faults.support import leaked_pages, small_request
from tests.tiny_models import build_tiny_llama

KV_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 1.0
PROMPT = list(range(1000, 1040))  # 40 tokens: 3 pages of 16
SAMPLING = sampling_to_pb(SamplingParams(max_new_tokens=8))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("timeouts")
    cluster = start_cluster(
        build_tiny_llama(tmp_path / "tiny"),
        tmp_path / "logs",
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        decode_args=["--kv-timeout-s", str(KV_TIMEOUT_S)],
        prefill_args=["--kv-send-timeout-s", str(SEND_TIMEOUT_S)],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def test_decode_frees_reserved_pages_when_their_kv_never_arrives(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.decode_addrs[0]) as channel:
        stream = pb_grpc.DecodeWorkerStub(channel).Generate(
            pb.GenerateRequest(
                request_id=uuid.uuid4().hex, prompt_token_ids=PROMPT, sampling=SAMPLING
            ),
            timeout=60,
        )
        reserved = next(stream)
        assert reserved.WhichOneof("event") == "reserved"
        assert len(reserved.reserved.page_ids) == 3
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            next(stream)  # no prefill ever comes
        waited = time.monotonic() - started
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert KV_TIMEOUT_S - 0.5 < waited < KV_TIMEOUT_S + 3, waited
    assert leaked_pages(cluster, timeout_s=2) == 0
    assert small_request(cluster).status_code == 200


def _prefill_to(cluster: Cluster, endpoint: str) -> tuple[grpc.StatusCode, str, float]:
    target = pb.KvTarget(endpoint=endpoint, page_ids=[0, 1, 2], transport="zmq")
    started = time.monotonic()
    with (
        grpc.insecure_channel(cluster.prefill_addrs[0]) as channel,
        pytest.raises(grpc.RpcError) as failure,
    ):
        pb_grpc.PrefillWorkerStub(channel).Prefill(
            pb.PrefillRequest(
                request_id=uuid.uuid4().hex,
                prompt_token_ids=PROMPT,
                sampling=SAMPLING,
                kv_target=target,
            ),
            timeout=60,
        )
    error = failure.value
    return error.code(), error.details() or "", time.monotonic() - started


def test_prefill_gives_up_on_a_decode_worker_that_never_takes_its_kv(cluster: Cluster) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"  # no decode worker listens there
    code, details, waited = _prefill_to(cluster, nobody)
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert "KV transfer failed" in details
    assert SEND_TIMEOUT_S - 0.2 < waited < SEND_TIMEOUT_S + 3, waited
    # The same dead endpoint again: given up on at once, the engine is not held up.
    code, details, waited = _prefill_to(cluster, nobody)
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert waited < SEND_TIMEOUT_S, waited
    assert leaked_pages(cluster, timeout_s=2) == 0
    assert small_request(cluster).status_code == 200
