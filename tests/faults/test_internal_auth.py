"""The internal token: the workers' gRPC refuses callers without it, and the KV channel
(ZeroMQ CURVE, keys derived from it) refuses peers without it.

Real processes, tiny model. The forgery is shown to work against a decode worker that has
no token (it accepts the forged KV and streams tokens from it), so its failure against
the guarded one is the channel's doing, not a malformed message.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import httpx
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.processes import ChildProcess, free_port, grpc_serving
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc
from shared.rpc.convert import sampling_to_pb
from shared.sampler import SamplingParams
from shared.transfer.auth import curve_keys, secure_client
from shared.transfer.messages import KvChunk, KvDone, encode
from tests.cluster import Cluster, start_cluster
from tests.faults.support import completion_body, leaked_pages, metric
from tests.tiny_models import build_tiny_llama

TOKEN = secrets.token_urlsafe(32)
KV_TIMEOUT_S = 3.0
PROMPT = list(range(2000, 2040))  # 40 tokens: 3 pages of 16
SAMPLING = sampling_to_pb(SamplingParams(max_new_tokens=4))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("auth") / "tiny")


@pytest.fixture(scope="module")
def cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        model,
        tmp_path_factory.mktemp("auth-logs"),
        kv_cache_mb=16,
        metrics=True,
        worker_args=["--num-threads", "1"],
        decode_args=["--kv-timeout-s", str(KV_TIMEOUT_S)],
        internal_token=TOKEN,
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def open_decode(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A decode worker without a token: the control for the forgery."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("open-decode") / "decode.log"
    process = ChildProcess.kvrelay(
        "open-decode",
        [
            "decode",
            "--port",
            str(port),
            "--model-path",
            str(model),
            "--kv-cache-mb",
            "16",
            "--num-threads",
            "1",
            "--kv-timeout-s",
            str(KV_TIMEOUT_S),
        ],
        env={"KVRELAY_INTERNAL_TOKEN": ""},
        log_path=log_path,
    ).start()
    try:
        process.wait_ready(partial(grpc_serving, f"127.0.0.1:{port}"), timeout_s=120)
        yield f"127.0.0.1:{port}"
    finally:
        process.stop()


def _code(call: Callable[[], object] | Iterator[object]) -> grpc.StatusCode:
    """The status a call (or the first read of a stream) fails with."""
    with pytest.raises(grpc.RpcError) as failure:
        if isinstance(call, Iterator):
            next(call)
        else:
            call()
    code: grpc.StatusCode = failure.value.code()
    return code


def test_grpc_calls_without_the_right_token_are_refused(cluster: Cluster) -> None:
    wrong = (("authorization", f"Bearer {TOKEN[:-1]}x"),)
    with grpc.insecure_channel(cluster.prefill_addrs[0]) as channel:
        stub = pb_grpc.PrefillWorkerStub(channel)
        for metadata in ((), wrong, (("authorization", TOKEN),)):  # no "Bearer ": wrong too
            info = partial(stub.GetInfo, pb.WorkerInfoRequest(), timeout=5, metadata=metadata)
            assert _code(info) == grpc.StatusCode.UNAUTHENTICATED
        prefill = partial(
            stub.Prefill,
            pb.PrefillRequest(request_id="x", prompt_token_ids=PROMPT, sampling=SAMPLING),
            timeout=5,
        )
        assert _code(prefill) == grpc.StatusCode.UNAUTHENTICATED
        # Health checks stay open (they reveal nothing but SERVING)...
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # ...and the right token is let through.
        assert stub.GetInfo(pb.WorkerInfoRequest(), timeout=5, metadata=cluster.grpc_metadata())
    with grpc.insecure_channel(cluster.decode_addrs[0]) as channel:
        stream = pb_grpc.DecodeWorkerStub(channel).Generate(
            pb.GenerateRequest(request_id="x", prompt_token_ids=PROMPT, sampling=SAMPLING),
            timeout=5,
        )
        assert _code(stream) == grpc.StatusCode.UNAUTHENTICATED
    assert leaked_pages(cluster) == 0


def test_the_gateway_serves_through_the_guarded_plane(cluster: Cluster) -> None:
    body = completion_body(cluster, "hello there", 8)
    response = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    # The token never shows in a log line or a command line.
    for process in cluster.processes:
        assert TOKEN not in " ".join(process.argv)
    assert TOKEN not in cluster.logs()


def _model_shape(model: Path) -> tuple[int, int, int]:
    config = json.loads((model / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"], config["num_key_value_heads"], head_dim


def _forge(
    endpoint: str, request_id: str, page_ids: list[int], model: Path, keys_from: str | None
) -> None:
    """Sends a whole request's KV (zeros) and its KvDone, as a stray client would."""
    layers, kv_heads, head_dim = _model_shape(model)
    chunk = KvChunk(request_id, 0, layers, page_ids, 16, kv_heads, head_dim, "float32")
    data = bytes(layers * 2 * len(page_ids) * 16 * kv_heads * head_dim * 4)
    done = KvDone(request_id, len(PROMPT), 1, [7], [0.0])
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 2000)
    # A guarded worker may drop the connection before any pipe exists, where a send would
    # wait for one for ever: then nothing was sent, which the caller's checks then see.
    socket.setsockopt(zmq.SNDTIMEO, 3000)
    if keys_from is not None:
        secure_client(socket, curve_keys(keys_from))  # the CURVE handshake, with other keys
    try:
        socket.connect(endpoint)
        time.sleep(0.3)
        socket.send_multipart([encode(chunk), data])
        socket.send(encode(done))
    except zmq.Again:
        pass
    finally:
        socket.close()
        context.term()


def _reserve_and_forge(
    address: str, metadata: tuple[tuple[str, str], ...], model: Path, keys_from: str | None
) -> tuple[list[pb.GenerateEvent], grpc.StatusCode]:
    """Reserves pages on decode, forges their KV; the events that followed, and the end."""
    request_id = uuid.uuid4().hex
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.DecodeWorkerStub(channel).Generate(
            pb.GenerateRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=SAMPLING),
            timeout=30,
            metadata=metadata,
        )
        reserved = next(stream).reserved
        _forge(reserved.endpoint, request_id, list(reserved.page_ids), model, keys_from)
        events: list[pb.GenerateEvent] = []
        try:
            events.extend(stream)
            return events, grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return events, exc.code()


def test_a_forged_kv_chunk_is_taken_by_an_open_decode_worker(open_decode: str, model: Path) -> None:
    """The control: without a token, the stray client's KV is used."""
    events, code = _reserve_and_forge(open_decode, (), model, keys_from=None)
    assert code == grpc.StatusCode.OK
    assert events and events[-1].tokens.finish_reason, events


@pytest.mark.parametrize("keys_from", [None, "not-the-token"])
def test_a_forged_kv_chunk_changes_nothing_on_a_guarded_decode_worker(
    cluster: Cluster, model: Path, keys_from: str | None
) -> None:
    url = cluster.metrics_urls["decode-0"]
    received = metric(url, "kvrelay_kv_transfer_bytes_total", side="receive")
    failures = metric(url, "kvrelay_kv_transfer_failures_total")
    events, code = _reserve_and_forge(
        cluster.decode_addrs[0], cluster.grpc_metadata(), model, keys_from
    )
    # Nothing landed: no tokens, the reservation timed out waiting for its real KV.
    assert events == []
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert metric(url, "kvrelay_kv_transfer_bytes_total", side="receive") == received
    assert metric(url, "kvrelay_kv_transfer_failures_total") == failures  # not even parsed
    assert leaked_pages(cluster) == 0
    body = completion_body(cluster, "still serving", 4)
    response = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
