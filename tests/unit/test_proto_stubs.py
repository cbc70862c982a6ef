"""The checked-in gRPC stubs are exactly what proto/kvrelay.proto generates."""

from __future__ import annotations

from shared.rpc import codegen


def test_checked_in_stubs_are_up_to_date() -> None:
    for name, text in codegen.generated_text().items():
        checked_in = (codegen.PACKAGE_DIR / name).read_text()
        assert checked_in == text, f"{name} is stale: run `make proto`"


def test_stubs_import_by_package_path() -> None:
    from shared.rpc import kvrelay_pb2, kvrelay_pb2_grpc

    assert kvrelay_pb2_grpc.kvrelay__pb2 is kvrelay_pb2
