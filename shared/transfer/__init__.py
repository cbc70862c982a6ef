"""KV transfer from prefill to decode workers: one protocol, pluggable backends."""

from __future__ import annotations

from shared.kv_pool import KVPool
from shared.transfer.base import KvArrival, KvReceiver, KvSender, KvTransferError

TRANSPORTS = ("zmq", "nixl", "local")


def make_sender(
    transport: str,
    pool: KVPool | None = None,
    worker_id: str = "",
    *,
    internal_token: str | None = None,
    send_timeout_s: float = 3.0,
) -> KvSender:
    """`pool`: the KV pool the sender reads from (nixl registers it once, up front).
    `internal_token`: zmq authenticates and encrypts the channel with keys derived from it."""
    if transport == "zmq":
        from shared.transfer.auth import curve_keys
        from shared.transfer.zmq_transport import ZmqKvSender

        curve = curve_keys(internal_token) if internal_token else None
        return ZmqKvSender(send_timeout_s, curve)
    if transport == "nixl":
        if pool is None:
            raise ValueError("the nixl KV transport needs the KV pool to register")
        from shared.transfer.auth import curve_keys
        from shared.transfer.nixl_transport import NixlKvSender

        curve = curve_keys(internal_token) if internal_token else None
        return NixlKvSender(pool, worker_id, send_timeout_s, curve=curve)
    raise ValueError(f"unknown KV transport {transport!r}; choose from {TRANSPORTS}")


def make_receiver(
    transport: str,
    pool: KVPool,
    bind_host: str,
    port: int,
    advertise_host: str,
    worker_id: str = "",
    *,
    internal_token: str | None = None,
) -> KvReceiver:
    if transport == "local":
        from shared.transfer.local_transport import LocalKvReceiver

        return LocalKvReceiver(pool, worker_id)
    if transport == "zmq":
        from shared.transfer.auth import curve_keys
        from shared.transfer.zmq_transport import ZmqKvReceiver

        curve = curve_keys(internal_token) if internal_token else None
        return ZmqKvReceiver(pool, bind_host, port, advertise_host, curve)
    if transport == "nixl":
        from shared.transfer.auth import curve_keys
        from shared.transfer.nixl_transport import NixlKvReceiver

        curve = curve_keys(internal_token) if internal_token else None
        return NixlKvReceiver(pool, bind_host, port, advertise_host, worker_id, curve)
    raise ValueError(f"unknown KV transport {transport!r}; choose from {TRANSPORTS}")


__all__ = ["KvArrival", "KvReceiver", "KvSender", "KvTransferError", "make_receiver", "make_sender"]
