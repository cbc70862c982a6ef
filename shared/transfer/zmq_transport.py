"""ZeroMQ backend: one PUSH socket per decode endpoint, a PULL socket on decode.

A chunk is a two-frame message, msgpack header then the raw tensor bytes, sent
without copying. ZeroMQ keeps the order of messages on one connection, so a
request's KvDone arrives after its chunks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import zmq

from shared.kv_pool import KVPool
from shared.transfer.base import KvReceiver, KvSender, KvTransferError
from shared.transfer.messages import KvAbort, KvChunk, KvDone, decode, encode

log = logging.getLogger(__name__)


class ZmqKvReceiver(KvReceiver):
    def __init__(self, pool: KVPool, bind_host: str, port: int, advertise_host: str) -> None:
        super().__init__(pool)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
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

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._closing.is_set():
            if not poller.poll(100):
                continue
            frames = self._socket.recv_multipart(copy=False)
            try:
                message = decode(frames[0].bytes)
            except (ValueError, TypeError) as exc:
                log.warning("dropping a malformed KV message: %s", exc)
                continue
            if isinstance(message, KvChunk):
                if len(frames) != 2:
                    log.warning("dropping KV chunk of %s: no data frame", message.request_id)
                    continue
                self.on_chunk(message, frames[1].buffer)
            elif isinstance(message, KvDone):
                self.on_done(message)
            else:
                self.on_abort(message)


class ZmqKvSender(KvSender):
    def __init__(self, send_timeout_s: float = 10.0) -> None:
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._send_timeout_ms = int(send_timeout_s * 1000)

    def _socket(self, endpoint: str) -> zmq.Socket[bytes]:
        socket = self._sockets.get(endpoint)
        if socket is None:
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            # Without IMMEDIATE a send to an unreachable decode worker would be queued
            # silently; with it, the send times out and the request fails cleanly.
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.SNDTIMEO, self._send_timeout_ms)
            socket.connect(endpoint)
            self._sockets[endpoint] = socket
        return socket

    def _send_chunk(self, endpoint: str, header: KvChunk, block: torch.Tensor) -> int:
        # numpy exposes the tensor's memory as a buffer; ZeroMQ sends it without a copy.
        data: Any = block.contiguous().view(torch.uint8).numpy()
        try:
            self._socket(endpoint).send_multipart([encode(header), data], copy=False)
        except zmq.Again as exc:
            self._drop(endpoint)
            raise KvTransferError(f"decode worker at {endpoint} did not take the KV") from exc
        return int(data.nbytes)

    def _send_control(self, endpoint: str, message: KvDone | KvAbort) -> None:
        try:
            self._socket(endpoint).send(encode(message))
        except zmq.Again as exc:
            self._drop(endpoint)
            raise KvTransferError(f"decode worker at {endpoint} is unreachable") from exc

    def _drop(self, endpoint: str) -> None:
        socket = self._sockets.pop(endpoint, None)
        if socket is not None:
            socket.close()

    def close(self) -> None:
        for endpoint in list(self._sockets):
            self._drop(endpoint)
