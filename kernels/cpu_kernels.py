"""kvrelay's C++ CPU kernels (kernels/cpu/*.cpp): built once per machine, loaded as torch ops.

They are compiled on first use with torch's extension builder (a C++ compiler and ninja) for
this CPU (-march=native) into kvrelay's cache, keyed by the sources, torch's version and the
CPU's flags, so a cache shared between machines never loads code built for another CPU.
`make install` builds them ahead (python -m kernels.cpu_kernels). Where they cannot be
built the torch reference paths run instead, with one warning in the log;
KVRELAY_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
EXTENSION = "kvrelay_cpu_kernels"
# -fopenmp: at::parallel_for is inline OpenMP; it links the libgomp torch already loaded.
# -ffp-contract=off: a*b + c stays two roundings, as torch computes it (no silent FMA).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    from shared.model.loader import cache_root

    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.read_bytes())
    key.update(" ".join([torch.__version__, *CFLAGS, _cpu_flags()]).encode())
    return cache_root() / "kernels" / key.hexdigest()[:16]


@functools.cache
def available() -> bool:
    """True once the kernels are loaded as torch.ops.kvrelay.*; builds them if needed."""
    if os.environ.get("KVRELAY_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load
    except ImportError as exc:  # pragma: no cover - torch always ships it
        log.warning("CPU kernels unavailable (%s); using the torch paths", exc)
        return False
    directory = build_dir()
    started = time.monotonic()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Concurrent builders (several workers starting at once) wait on torch's lock file.
        load(
            name=EXTENSION,
            sources=[str(s) for s in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache: say so once
        log.warning("CPU kernels could not be built (%s); using the torch paths", exc)
        return False
    elapsed = time.monotonic() - started
    if elapsed > 1.0:
        log.info("built CPU kernels in %.0fs (%s)", elapsed, directory)
    return True


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One new token per sequence over its pages: q [seqs, heads, head_dim] -> same shape."""
    out: torch.Tensor = torch.ops.kvrelay.paged_decode_attention(
        q, k_cache, v_cache, page_table, seq_lens, scale, window or 0
    )
    return out


def greedy_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (first on ties) of float32 logits [rows, vocab]: int64 [rows]."""
    out: torch.Tensor = torch.ops.kvrelay.greedy_rows(logits)
    return out


@functools.cache
def gguf_linear_supported() -> bool:
    """Whether gguf_linear runs here: the kernels are built and the CPU has AMX (bf16)."""
    return available() and bool(torch.ops.kvrelay.gguf_linear_supported())


def gguf_pack(blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """GGUF blocks [out, bytes per row] in the layout gguf_linear reads (flat uint8)."""
    out: torch.Tensor = torch.ops.kvrelay.gguf_pack(blocks, ggml_type, in_features)
    return out


def gguf_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    ggml_type: int,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """bfloat16 x [rows, in] times the packed weight [out, in] transposed: [rows, out]."""
    out: torch.Tensor = torch.ops.kvrelay.gguf_linear(x, packed, ggml_type, out_features, bias)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Never fails an install: without the kernels the torch paths serve, only slower.
    ready = available()
    print(f"CPU kernels: {'ready in ' + str(build_dir()) if ready else 'not built (torch paths)'}")
    sys.exit(0)
