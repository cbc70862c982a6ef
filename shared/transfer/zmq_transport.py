"""ZeroMQ backend: one PUSH socket per decode endpoint, a PULL socket on decode.

A chunk is a two-frame message, msgpack header then the raw tensor bytes, sent
without copying. ZeroMQ keeps the order of messages on one connection, so a
request's KvDone arrives after its chunks.

With CURVE keys (shared/transfer/auth.py, from the internal token) the channel is
authenticated and encrypted: decode admits only peers that hold the token.

A send fails its request at once when the connection to the decode worker dropped (a
socket monitor says so), and after `send_timeout_s` when the worker does not take the KV
(hung, or never reached). For a while after a failure, sends to the same endpoint give up
after FAST_FAIL_S: one dead decode worker costs the prefill engine one wait, not one per
request queued for it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from shared.kv_pool import KVPool
from shared.observability.worker_metrics import worker_metrics
from shared.transfer.auth import CurveKeys, CurveServer, secure_client
from shared.transfer.base import KvReceiver, KvSender, KvTransferError
from shared.transfer.messages import KvAbort, KvChunk, KvDone, decode, encode

log = logging.getLogger(__name__)

FAST_FAIL_S = 0.2  # send timeout towards an endpoint that just timed out
SUSPECT_FOR_S = 30.0  # how long an endpoint that timed out stays suspect


class ZmqKvReceiver(KvReceiver):
    def __init__(
        self,
        pool: KVPool,
        bind_host: str,
        port: int,
        advertise_host: str,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(pool)
        self._curve: CurveServer | None = None
        if curve is None:
            self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        else:
            # A context of its own: its ZAP handler must not judge other sockets.
            self._context = zmq.Context()
            self._curve = CurveServer(self._context, curve)
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve.secure(self._socket)
        if port:
            self._socket.bind(f"tcp://{bind_host}:{port}")
        else:
            port = self._socket.bind_to_random_port(f"tcp://{bind_host}")
        self._endpoint = f"tcp://{advertise_host}:{port}"
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-receiver", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self._socket.close()
        if self._curve is not None:
            self._curve.close()
            self._context.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._closing.is_set():
            if not poller.poll(100):
                continue
            frames = self._socket.recv_multipart(copy=False)
            try:
                self._on_frames(frames)
            except Exception:
                # One bad message (or a request cancelled at the wrong moment) must not
                # end this thread: every later request's KV arrives through it.
                log.exception("KV message not handled")

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        try:
            message = decode(frames[0].bytes)
        except (ValueError, TypeError) as exc:
            log.warning("dropping a malformed KV message: %s", exc)
            return
        if isinstance(message, KvChunk):
            if len(frames) != 2:
                log.warning("dropping KV chunk of %s: no data frame", message.request_id)
                return
            self.on_chunk(message, frames[1].buffer)
        elif isinstance(message, KvDone):
            self.on_done(message)
        else:
            self.on_abort(message)


@dataclass(eq=False)
class _Peer:
    """One decode endpoint: its PUSH socket, and what its monitor said of the connection."""

    socket: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]
    lost: bool = False  # connected once, then disconnected (and not reconnected since)


class ZmqKvSender(KvSender):
    def __init__(self, send_timeout_s: float = 3.0, curve: CurveKeys | None = None) -> None:
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._peers: dict[str, _Peer] = {}
        self._send_timeout_s = send_timeout_s
        self._curve = curve
        self._timed_out_at: dict[str, float] = {}  # endpoint -> time.monotonic()

    def _peer(self, endpoint: str) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            # Without IMMEDIATE a send to an unreachable decode worker would be queued
            # silently; with it, the send waits for a connection and fails cleanly.
            socket.setsockopt(zmq.IMMEDIATE, 1)
            if self._curve is not None:
                secure_client(socket, self._curve)
            # The monitor tells a peer that died (its connection dropped) from a slow one.
            monitor = socket.get_monitor_socket(_CONNECTION_EVENTS)
            socket.connect(endpoint)
            peer = self._peers[endpoint] = _Peer(socket, monitor)
        return peer

    def _socket(self, endpoint: str) -> zmq.Socket[bytes]:
        """The endpoint's socket, its sends bounded by the send timeout (for subclasses that
        send on it themselves; `_send` also fails at once on a dropped connection)."""
        socket = self._peer(endpoint).socket
        socket.setsockopt(zmq.SNDTIMEO, int(self._send_timeout_s * 1000))
        return socket

    def _send_chunk(self, endpoint: str, header: KvChunk, block: torch.Tensor) -> int:
        # numpy exposes the tensor's memory as a buffer; ZeroMQ sends it without a copy.
        data: Any = block.contiguous().view(torch.uint8).numpy()
        self._send(endpoint, [encode(header), data], "did not take the KV")
        return int(data.nbytes)

    def _send_control(self, endpoint: str, message: KvDone | KvAbort) -> None:
        self._send(endpoint, [encode(message)], "is unreachable")

    def _send(self, endpoint: str, frames: list[Any], failure: str) -> None:
        peer = self._peer(endpoint)
        timed_out_at = self._timed_out_at.get(endpoint)
        suspect = timed_out_at is not None and time.monotonic() - timed_out_at < SUSPECT_FOR_S
        timeout_s = FAST_FAIL_S if suspect else self._send_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            _read_events(peer)
            if peer.lost:
                reason = "disconnected"
                break
            # Writable: connected, and the peer's queue has room (IMMEDIATE).
            if peer.socket.poll(POLL_MS, zmq.POLLOUT):
                try:
                    peer.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                if timed_out_at is not None:
                    del self._timed_out_at[endpoint]
                return
            if time.monotonic() >= deadline:
                reason = f"waited {timeout_s:.1f} s"
                break
        self._drop(endpoint)
        self._timed_out_at[endpoint] = time.monotonic()
        worker_metrics().transfer.failed("send", "unreachable")
        raise KvTransferError(f"decode worker at {endpoint} {failure} ({reason})")

    def _drop(self, endpoint: str, linger_s: float = 0.0) -> None:
        peer = self._peers.pop(endpoint, None)
        if peer is not None:
            peer.socket.disable_monitor()
            peer.monitor.close()
            peer.socket.close(linger=int(linger_s * 1000))

    def close(self) -> None:
        # KV already queued keeps going out (within the send timeout) while the process
        # lives; flush_queued_kv() waits for it before a worker exits.
        for endpoint in list(self._peers):
            self._drop(endpoint, linger_s=self._send_timeout_s)


def flush_queued_kv(timeout_s: float) -> bool:
    """Before a worker process exits: waits up to timeout_s for the messages its closed
    sockets still queue (a draining prefill's last KV) to go out. True when they did.

    Terminating the shared context waits for exactly that; it runs in a daemon thread so a
    socket left open can only cost the timeout, never hang the exit.
    """
    terminate = threading.Thread(target=zmq.Context.instance().term, daemon=True)
    terminate.start()
    terminate.join(timeout_s)
    return not terminate.is_alive()


_CONNECTION_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
POLL_MS = 20  # how often a waiting send looks at the connection's state


def _read_events(peer: _Peer) -> None:
    while peer.monitor.poll(0):
        event = recv_monitor_message(peer.monitor)["event"]
        if event == zmq.EVENT_DISCONNECTED:
            peer.lost = True
        elif event in (zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED):
            peer.lost = False
