"""What crosses the KV channel from a prefill worker to a decode worker.

Each message is a msgpack header, followed for a chunk by one raw tensor frame.
A request's KV is sent as chunks (one per layer group, so decode can copy while
prefill still sends) and closed by a KvDone that carries the first token of each choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack

WIRE_VERSION = 2


@dataclass(frozen=True)
class KvChunk:
    """KV of layers [layer_start, layer_end) for all of a request's pages.

    The frame after the header holds a tensor of shape
    [layer_end - layer_start, 2, len(dst_page_ids), page_size, num_kv_heads, head_dim].
    """

    request_id: str
    layer_start: int
    layer_end: int
    dst_page_ids: list[int]
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class KvDone:
    request_id: str
    num_tokens: int
    num_chunks: int
    first_token_ids: list[int]  # one per choice of the request
    first_token_logprobs: list[float]


@dataclass(frozen=True)
class KvAbort:
    """Prefill gave up on a request: decode frees its pages at once."""

    request_id: str
    reason: str


KvMessage = KvChunk | KvDone | KvAbort
_KINDS: dict[str, type[KvChunk] | type[KvDone] | type[KvAbort]] = {
    "chunk": KvChunk,
    "done": KvDone,
    "abort": KvAbort,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def encode(message: KvMessage) -> bytes:
    body: dict[str, Any] = asdict(message)
    body["kind"] = _KIND_OF[type(message)]
    body["v"] = WIRE_VERSION
    return msgpack.packb(body)


def decode(raw: bytes) -> KvMessage:
    body = msgpack.unpackb(raw)
    if not isinstance(body, dict) or body.pop("v", None) != WIRE_VERSION:
        raise ValueError("KV message of an unknown wire version")
    cls = _KINDS.get(body.pop("kind", ""))
    if cls is None:
        raise ValueError("KV message of an unknown kind")
    return cls(**body)
