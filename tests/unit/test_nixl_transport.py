"""The NIXL backend between two real agents (UCX on loopback) in this process.

Decode reads prefill's pages; these tests hold it to the transfer contract: exact bytes,
pages checked before any byte moves, no page reused while a read may still land in it,
and prefill's pages given back once read, refused or never read.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import torch
import zmq

from services.processes import free_port
from shared.kv_pool import KVPool
from shared.transfer import KvTransferError
from shared.transfer.auth import curve_keys
from shared.transfer.messages import KvChunk, KvDone
from shared.transfer.nixl_transport import NixlKvReceiver, NixlKvSender

# The default model's page geometry: 30 layers, 3 KV heads of 64, pages of 16 tokens.
GEOMETRY = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "page_size": 16}


@pytest.fixture(scope="module", autouse=True)
def loopback_ucx() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UCX_NET_DEVICES", "lo")
        yield


@pytest.fixture(scope="module")
def prefill_pool() -> KVPool:
    pool = KVPool(num_pages=256, **GEOMETRY)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(0)))
    return pool


@pytest.fixture(scope="module")
def sender(prefill_pool: KVPool) -> Iterator[NixlKvSender]:
    sender = NixlKvSender(prefill_pool, "test-prefill", send_timeout_s=2.0)
    yield sender
    sender.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[NixlKvReceiver]:
    receiver = NixlKvReceiver(KVPool(num_pages=192, **GEOMETRY), "127.0.0.1", 0, "127.0.0.1")
    yield receiver
    receiver.close()


def wait_until(condition: object, timeout_s: float = 5.0) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def chunk_for(request_id: str, dst_pages: list[int], layers: tuple[int, int] = (0, 30)) -> KvChunk:
    return KvChunk(request_id, *layers, dst_pages, 16, 3, 64, "float32")


def test_pages_arrive_exact_and_prefill_lets_go(
    sender: NixlKvSender, receiver: NixlKvReceiver, prefill_pool: KVPool
) -> None:
    decode_pool = receiver.pool
    decode_pool.allocate(3)  # reserved pages neither at the start nor in order
    reserved = list(reversed(decode_pool.allocate(100)))
    src = prefill_pool.allocate(100)
    request_id = uuid.uuid4().hex
    arrival = receiver.expect(request_id, reserved)
    # Two sends, as a chunked prefill makes them.
    first = sender.send_pages(
        request_id=request_id,
        endpoint=receiver.endpoint,
        pool=prefill_pool,
        src_page_ids=src[:40],
        dst_page_ids=reserved[:40],
    )
    second = sender.send_pages(
        request_id=request_id,
        endpoint=receiver.endpoint,
        pool=prefill_pool,
        src_page_ids=src[40:],
        dst_page_ids=reserved[40:],
    )
    sender.send_done(
        request_id=request_id,
        endpoint=receiver.endpoint,
        num_tokens=100 * 16 - 5,
        num_chunks=first[1] + second[1],
        first_token_ids=[42],
        first_token_logprobs=[-0.5],
    )
    result = arrival.result(timeout=20)
    assert result.num_tokens == 100 * 16 - 5 and result.first_token_ids == [42]
    assert first[0] + second[0] == 100 * decode_pool.page_bytes()
    assert first[1] == second[1] == 1  # all layers in one chunk: one read per send
    assert torch.equal(decode_pool.kv[:, :, reserved], prefill_pool.kv[:, :, src])
    prefill_pool.free(src)  # the engine's own reference; the sender's go when read
    assert wait_until(lambda: sender.num_held == 0)
    assert prefill_pool.num_free == prefill_pool.num_pages
    assert receiver.num_reads == 0


def test_cancel_while_reading_keeps_pages_until_the_bytes_landed(
    receiver: NixlKvReceiver,
) -> None:
    pool = receiver.pool
    free_before = pool.num_free
    pages = pool.allocate(4)
    future = receiver.expect("cancel-mid-read", pages)
    claim = receiver.claim_chunk(chunk_for("cancel-mid-read", pages))
    assert claim is not None
    receiver.cancel("cancel-mid-read")
    pool.free(pages)  # what the decode service does as soon as cancel returns
    assert future.cancelled()
    assert pool.num_free == free_before - 4  # a read may still land: not reusable yet
    receiver.chunk_landed(claim)
    assert pool.num_free == free_before


def test_done_before_the_last_read_lands_waits_for_it(receiver: NixlKvReceiver) -> None:
    pool = receiver.pool
    pages = pool.allocate(2)
    try:
        future = receiver.expect("done-early", pages)
        claim = receiver.claim_chunk(chunk_for("done-early", pages))
        assert claim is not None
        receiver.on_done(KvDone("done-early", 20, 1, [7], [-0.1]))
        assert not future.done()
        receiver.chunk_landed(claim)
        assert future.result(timeout=1).first_token_ids == [7]
    finally:
        pool.free(pages)


def test_failed_read_fails_its_request_and_frees_its_claim(receiver: NixlKvReceiver) -> None:
    pool = receiver.pool
    free_before = pool.num_free
    pages = pool.allocate(3)
    future = receiver.expect("read-fails", pages)
    claim = receiver.claim_chunk(chunk_for("read-fails", pages))
    assert claim is not None
    receiver.chunk_landed(claim, "peer gone")
    with pytest.raises(KvTransferError, match="peer gone"):
        future.result(timeout=1)
    assert receiver.num_expected == 0
    pool.free(pages)
    assert pool.num_free == free_before


def test_pages_outside_the_reservation_are_never_read(
    sender: NixlKvSender, receiver: NixlKvReceiver, prefill_pool: KVPool
) -> None:
    decode_pool = receiver.pool
    reserved = decode_pool.allocate(2)
    elsewhere = decode_pool.allocate(2)
    decode_pool.kv[:, :, elsewhere] = 0
    src = prefill_pool.allocate(2)
    try:
        future = receiver.expect("trespass", reserved)
        sender.send_pages(
            request_id="trespass",
            endpoint=receiver.endpoint,
            pool=prefill_pool,
            src_page_ids=src,
            dst_page_ids=elsewhere,
        )
        with pytest.raises(KvTransferError, match="outside the reservation"):
            future.result(timeout=10)
        # Refused before any byte moved, and prefill was told it may let go.
        assert wait_until(lambda: sender.num_held == 0)
        assert int(decode_pool.kv[:, :, elsewhere].count_nonzero()) == 0
    finally:
        decode_pool.free(reserved + elsewhere)
        prefill_pool.free(src)


def test_unexpected_request_reads_nothing_and_prefill_lets_go(
    sender: NixlKvSender, receiver: NixlKvReceiver, prefill_pool: KVPool
) -> None:
    decode_pool = receiver.pool
    pages = decode_pool.allocate(2)
    decode_pool.kv[:, :, pages] = 0
    src = prefill_pool.allocate(2)
    try:
        sender.send_pages(
            request_id="never-expected",
            endpoint=receiver.endpoint,
            pool=prefill_pool,
            src_page_ids=src,
            dst_page_ids=pages,
        )
        assert wait_until(lambda: sender.num_held == 0)
        assert int(decode_pool.kv[:, :, pages].count_nonzero()) == 0
    finally:
        decode_pool.free(pages)
        prefill_pool.free(src)
    assert prefill_pool.num_free == prefill_pool.num_pages


def test_pages_never_read_are_released_after_the_hold_timeout() -> None:
    pool = KVPool(num_pages=8, **GEOMETRY)
    # A decode endpoint that takes the control messages and never reads: a bare PULL socket.
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    silent = context.socket(zmq.PULL)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    sender = NixlKvSender(pool, "test-hold", hold_timeout_s=0.5)
    try:
        src = pool.allocate(3)
        sender.send_pages(
            request_id="r",
            endpoint=f"tcp://127.0.0.1:{port}",
            pool=pool,
            src_page_ids=src,
            dst_page_ids=[0, 1, 2],
        )
        pool.free(src)
        assert sender.num_held > 0 and pool.num_free == 5  # held for decode to read
        assert wait_until(lambda: pool.num_free == 8, timeout_s=5)
        assert sender.num_held == 0
    finally:
        sender.close()
        silent.close()


def test_send_to_an_unreachable_decode_fails_and_holds_nothing() -> None:
    pool = KVPool(num_pages=8, **GEOMETRY)
    sender = NixlKvSender(pool, "test-unreachable", send_timeout_s=0.3)
    try:
        src = pool.allocate(2)
        with pytest.raises(KvTransferError, match="did not take the KV"):
            sender.send_pages(
                request_id="r",
                endpoint=f"tcp://127.0.0.1:{free_port()}",
                pool=pool,
                src_page_ids=src,
                dst_page_ids=[0, 1],
            )
        assert sender.num_held == 0
        pool.free(src)
        assert pool.num_free == 8
    finally:
        sender.close()


def test_a_sender_refuses_a_pool_it_did_not_register(sender: NixlKvSender) -> None:
    other = KVPool(num_pages=4, **GEOMETRY)
    with pytest.raises(KvTransferError, match="another KV pool"):
        sender.send_pages(
            request_id="r",
            endpoint="tcp://127.0.0.1:1",
            pool=other,
            src_page_ids=[0],
            dst_page_ids=[0],
        )


def test_with_an_internal_token_only_its_holders_reach_decode(prefill_pool: KVPool) -> None:
    """The control channel, hello included, is CURVE-authenticated as ZeroMQ's is."""
    keys = curve_keys("kv-secret")
    decode_pool = KVPool(num_pages=8, **GEOMETRY)
    decode_pool.allocate(8)
    receiver = NixlKvReceiver(decode_pool, "127.0.0.1", 0, "127.0.0.1", curve=keys)
    trusted = NixlKvSender(prefill_pool, "trusted", send_timeout_s=5.0, curve=keys)
    stranger = NixlKvSender(prefill_pool, "stranger", send_timeout_s=0.5)
    src = prefill_pool.allocate(2)
    try:
        arrival = receiver.expect("secured", [3, 4])
        _, chunks = trusted.send_pages(
            request_id="secured",
            endpoint=receiver.endpoint,
            pool=prefill_pool,
            src_page_ids=src,
            dst_page_ids=[3, 4],
        )
        trusted.send_done(
            request_id="secured",
            endpoint=receiver.endpoint,
            num_tokens=32,
            num_chunks=chunks,
            first_token_ids=[1],
            first_token_logprobs=[0.0],
        )
        arrival.result(timeout=20)
        assert torch.equal(decode_pool.kv[:, :, [3, 4]], prefill_pool.kv[:, :, src])
        with pytest.raises(KvTransferError):
            stranger.send_pages(
                request_id="intruder",
                endpoint=receiver.endpoint,
                pool=prefill_pool,
                src_page_ids=src,
                dst_page_ids=[5, 6],
            )
        assert stranger.num_held == 0
    finally:
        prefill_pool.free(src)
        stranger.close()
        trusted.close()
        receiver.close()
