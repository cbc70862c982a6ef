"""KV transfer from prefill to decode workers: one protocol, pluggable backends."""

from __future__ import annotations

from shared.kv_pool import KVPool
from shared.transfer.base import KvArrival, KvReceiver, KvSender, KvTransferError

TRANSPORTS = ("zmq", "local")


def make_sender(transport: str) -> KvSender:
    if transport == "zmq":
        from shared.transfer.zmq_transport import ZmqKvSender

        return ZmqKvSender()
    raise ValueError(f"unknown KV transport {transport!r}; choose from {TRANSPORTS}")


def make_receiver(
    transport: str, pool: KVPool, bind_host: str, port: int, advertise_host: str,
    worker_id: str = "",
) -> KvReceiver:
    if transport == "local":
        from shared.transfer.local_transport import LocalKvReceiver

        return LocalKvReceiver(pool, worker_id)
    if transport == "zmq":
        from shared.transfer.zmq_transport import ZmqKvReceiver

        return ZmqKvReceiver(pool, bind_host, port, advertise_host)
    raise ValueError(f"unknown KV transport {transport!r}; choose from {TRANSPORTS}")


__all__ = ["KvArrival", "KvReceiver", "KvSender", "KvTransferError", "make_receiver", "make_sender"]
