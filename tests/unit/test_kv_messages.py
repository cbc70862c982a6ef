from __future__ import annotations

import msgpack
import pytest

from shared.transfer.messages import WIRE_VERSION, KvAbort, KvChunk, KvDone, decode, encode


@pytest.mark.parametrize(
    "message",
    [
        KvChunk("r1", 0, 4, [3, 1, 2], 16, 3, 64, "float32"),
        KvDone("r1", 40, 8, [504, 7], [-1.5, -0.25]),
        KvAbort("r1", "prefill failed"),
    ],
)
def test_messages_round_trip(message: KvChunk | KvDone | KvAbort) -> None:
    assert decode(encode(message)) == message


def test_unknown_kind_and_version_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        decode(msgpack.packb({"v": WIRE_VERSION, "kind": "steal", "request_id": "r"}))
    with pytest.raises(ValueError, match="version"):
        decode(msgpack.packb({"v": 99, "kind": "done"}))
    with pytest.raises(ValueError, match="version"):
        decode(msgpack.packb([1, 2, 3]))
