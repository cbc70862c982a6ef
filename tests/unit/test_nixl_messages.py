"""The NIXL control messages and the descriptor arithmetic over a real KV pool."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared.kv_pool import KVPool
from shared.transfer.messages import WIRE_VERSION, KvAbort, KvChunk, KvDone, encode
from shared.transfer.nixl_memory import page_runs, pool_layout, run_descriptors
from shared.transfer.nixl_messages import (
    NixlHello,
    NixlPages,
    PoolLayout,
    decode_control,
    encode_pages,
)

CHUNK = KvChunk("r1", 2, 5, [9, 4, 5], 16, 3, 64, "float32")
LAYOUT = PoolLayout(0x7F00_0000_1000, 30, 512, 12288, "DRAM", 0)


@pytest.mark.parametrize(
    "message",
    [
        NixlPages(CHUNK, "prefill-1", [0, 1, 7], ticket=12),
        NixlPages(CHUNK, "prefill-1", [0, 1, 7], 13, NixlHello("prefill-1", b"\x00md\xff", LAYOUT)),
        KvDone("r1", 40, 8, [504], [-1.5]),
        KvAbort("r1", "prefill failed"),
    ],
)
def test_control_messages_round_trip(message: NixlPages | KvDone | KvAbort) -> None:
    raw = encode_pages(message) if isinstance(message, NixlPages) else encode(message)
    assert decode_control(raw) == message


def test_malformed_control_messages_are_refused() -> None:
    with pytest.raises(ValueError, match="bytes on the NIXL channel"):
        decode_control(encode(CHUNK))  # a ZeroMQ chunk header: its bytes cannot come here
    with pytest.raises(ValueError, match="version"):
        decode_control(msgpack.packb({"v": 99, "kind": "nixl_pages"}))
    with pytest.raises(TypeError):
        decode_control(msgpack.packb({"v": WIRE_VERSION, "kind": "nixl_pages", "chunk": 3}))
    with pytest.raises(ValueError):
        decode_control(b"\xc1 not msgpack")


def test_page_runs_merge_pages_consecutive_on_both_sides() -> None:
    assert page_runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 7]) == [(4, 0, 3), (9, 3, 1), (10, 7, 1)]
    assert page_runs([3, 2, 1], [1, 2, 3]) == [(3, 1, 1), (2, 2, 1), (1, 3, 1)]
    assert page_runs([], []) == []


def test_descriptors_address_the_pool_pages() -> None:
    pool = KVPool(num_layers=4, num_kv_heads=2, head_dim=8, num_pages=10, page_size=4)
    layout = pool_layout(pool)
    assert layout.mem_type == "DRAM"
    assert layout.page_bytes == 4 * 2 * 8 * 4
    rows = run_descriptors(layout, starts=[6, 1], lengths=[2, 3], layer_start=1, layer_end=3)
    assert rows.dtype == np.uint64
    expected = [
        (pool.kv[layer, kv, start].data_ptr(), length * layout.page_bytes, 0)
        for layer in (1, 2)
        for kv in (0, 1)
        for start, length in ((6, 2), (1, 3))
    ]
    assert [tuple(int(x) for x in row) for row in rows] == expected
    # A run's pages are contiguous in one layer's K (or V): one descriptor covers them.
    assert pool.kv[1, 0, 1:4].is_contiguous()
    assert pool.kv[1, 0, 1].data_ptr() + 3 * layout.page_bytes == pool.kv[1, 0, 4].data_ptr()
