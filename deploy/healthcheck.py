#!/usr/bin/env python3
"""Probe of one kvrelay service, run next to it: exit 0 when healthy, 1 when not.

    kvrelay-healthcheck grpc 127.0.0.1:50051              # standard gRPC health: SERVING
    kvrelay-healthcheck http http://127.0.0.1:30000/health
    kvrelay-healthcheck                                   # the service this container runs

Installed in the images as /usr/local/bin/kvrelay-healthcheck (their HEALTHCHECK, the
compose healthchecks); the multi-host test runs it inside each service's namespace.
Without arguments it reads the container's main command (/proc/1/cmdline) and KVRELAY_PORT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services.processes import grpc_serving, http_healthy

GATEWAY_DEFAULT_PORT = 30000
TIMEOUT_S = 3.0


def _main_command(proc_cmdline: Path = Path("/proc/1/cmdline")) -> list[str]:
    try:
        return [a for a in proc_cmdline.read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _flag(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def probe_from_container(argv: list[str] | None = None) -> tuple[str, str] | str:
    """(kind, target) of the service in this container, or why there is none."""
    argv = _main_command() if argv is None else argv
    role = next((a for a in argv if a in ("gateway", "up", "prefill", "decode")), None)
    if role is None:
        return f"no kvrelay service in the main command {argv!r}"
    port = _flag(argv, "--port") or os.environ.get("KVRELAY_PORT")
    if role in ("gateway", "up"):
        return "http", f"http://127.0.0.1:{port or GATEWAY_DEFAULT_PORT}/health"
    if not port or port == "0":
        return f"the {role} worker has no fixed port (set KVRELAY_PORT)"
    return "grpc", f"127.0.0.1:{port}"


def healthy(kind: str, target: str) -> bool:
    if kind == "grpc":
        return grpc_serving(target, timeout_s=TIMEOUT_S)
    if kind == "http":
        return http_healthy(target, timeout_s=TIMEOUT_S)
    raise ValueError(f"unknown probe {kind!r}: grpc or http")


def main(argv: list[str]) -> int:
    if len(argv) == 2:
        kind, target = argv
    elif not argv:
        found = probe_from_container()
        if isinstance(found, str):
            print(found, file=sys.stderr)
            return 1
        kind, target = found
    else:
        print(__doc__, file=sys.stderr)
        return 2
    ok = healthy(kind, target)
    if not ok:
        print(f"{kind} {target}: not healthy", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
