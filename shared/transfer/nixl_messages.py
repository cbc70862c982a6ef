"""What the NIXL backend adds to the KV channel: where a chunk's bytes are, to be read.

Control messages travel over the same ZeroMQ channel as with the ZeroMQ backend, one
msgpack frame each: KvDone and KvAbort as `messages.py` defines them, and NixlPages in
place of a KvChunk with its data frame. The bytes themselves never cross this channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from shared.transfer.messages import WIRE_VERSION, KvAbort, KvChunk, KvDone
from shared.transfer.messages import decode as decode_kv_message

_PAGES_KIND = "nixl_pages"


@dataclass(frozen=True)
class PoolLayout:
    """Where a worker's KV pool lies in its registered memory.

    The pool is one contiguous tensor [num_layers, 2, num_pages, page...]: the K (kv=0) or
    V (kv=1) of page p in layer l starts at
    `address + ((l * 2 + kv) * num_pages + p) * page_bytes`.
    """

    address: int
    num_layers: int
    num_pages: int
    page_bytes: int  # one page of one layer's K (or V)
    mem_type: str  # "DRAM" or "VRAM"
    device_id: int


@dataclass(frozen=True)
class NixlHello:
    """How to reach a prefill worker's NIXL agent and read its KV pool."""

    agent_name: str
    agent_metadata: bytes
    pool: PoolLayout


@dataclass(frozen=True)
class NixlPages:
    """A KvChunk whose bytes wait in the prefill worker's pool, for decode to read.

    `ticket` comes back to the prefill agent in a NIXL notification once decode has read
    the pages (or decided not to): prefill holds them until then. `hello` rides on the first
    chunk of each send, so a decode worker that started after this prefill still learns how
    to reach it.
    """

    chunk: KvChunk
    agent_name: str
    src_page_ids: list[int]
    ticket: int
    hello: NixlHello | None = None


ControlMessage = NixlPages | KvDone | KvAbort


def encode_pages(message: NixlPages) -> bytes:
    body: dict[str, Any] = asdict(message)
    body["kind"] = _PAGES_KIND
    body["v"] = WIRE_VERSION
    return msgpack.packb(body)


def decode_control(raw: bytes) -> ControlMessage:
    """A NixlPages, KvDone or KvAbort; ValueError or TypeError when malformed."""
    body = msgpack.unpackb(raw)
    if isinstance(body, dict) and body.get("kind") == _PAGES_KIND:
        if body.pop("v", None) != WIRE_VERSION:
            raise ValueError("KV message of an unknown wire version")
        del body["kind"]
        hello = body.pop("hello", None)
        return NixlPages(
            chunk=KvChunk(**body.pop("chunk")),
            hello=None if hello is None else _hello(hello),
            **body,
        )
    message = decode_kv_message(raw)
    if isinstance(message, KvChunk):
        raise ValueError("a KvChunk with its bytes on the NIXL channel")
    return message


def _hello(body: dict[str, Any]) -> NixlHello:
    return NixlHello(
        agent_name=body["agent_name"],
        agent_metadata=body["agent_metadata"],
        pool=PoolLayout(**body["pool"]),
    )
