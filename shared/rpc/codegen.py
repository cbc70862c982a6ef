"""Generates the gRPC stubs in this package from proto/kvrelay.proto.

Run `python -m shared.rpc.codegen` after editing the .proto; a test checks that the
checked-in stubs are what this produces.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent.parent / "proto"
PROTO_FILE = "kvrelay.proto"
GENERATED = ("kvrelay_pb2.py", "kvrelay_pb2.pyi", "kvrelay_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    # protoc (grpc_tools, a build-time tool) runs in a process of its own: in-process it
    # shares native state with whatever the caller loaded (it crashed after UCX had run).
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_FILE),
    ]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}: {result.stderr.strip()}")
    # protoc writes `import kvrelay_pb2`, which only works with the folder on sys.path.
    grpc_file = out_dir / "kvrelay_pb2_grpc.py"
    text = re.sub(
        r"^import kvrelay_pb2 as",
        "from shared.rpc import kvrelay_pb2 as",
        grpc_file.read_text(),
        flags=re.M,
    )
    grpc_file.write_text(text)


def generated_text() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return {name: (Path(tmp) / name).read_text() for name in GENERATED}


def main() -> int:
    for name, text in generated_text().items():
        (PACKAGE_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
