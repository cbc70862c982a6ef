"""KV pool memory as NIXL sees it: one registered region per pool, descriptors per page run."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.kv_pool import KVPool
from shared.transfer.nixl_messages import PoolLayout


def nixl_api() -> Any:
    """The `nixl._api` module, imported on first use (CPU installs of other transports
    never load it)."""
    try:
        from nixl import _api
    except ImportError as exc:
        raise RuntimeError(
            "the nixl KV transport needs NIXL: pip install nixl-cu12 && pip install --no-deps nixl"
        ) from exc
    return _api


def make_agent(name: str) -> Any:
    """A NIXL agent with the UCX backend and no progress thread of its own.

    NIXL's progress thread polls without pause (a whole core, measured); kvrelay's own
    threads drive progress when they poll transfers and notifications instead.
    """
    api = nixl_api()
    config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    agent = api.nixl_agent(name, config)
    if "UCX" not in agent.backends:
        raise RuntimeError("NIXL has no UCX backend on this machine")
    return agent


def pool_layout(pool: KVPool) -> PoolLayout:
    kv = pool.kv
    if not kv.is_contiguous():
        raise ValueError("the KV pool must be one contiguous tensor to register with NIXL")
    on_gpu = kv.device.type == "cuda"
    return PoolLayout(
        address=kv.data_ptr(),
        num_layers=pool.num_layers,
        num_pages=pool.num_pages,
        page_bytes=kv[0, 0, 0].numel() * kv.element_size(),
        mem_type="VRAM" if on_gpu else "DRAM",
        device_id=(kv.device.index or 0) if on_gpu else 0,
    )


def page_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the longest runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def run_descriptors(
    layout: PoolLayout, starts: list[int], lengths: list[int], layer_start: int, layer_end: int
) -> np.ndarray:
    """NIXL descriptors (address, bytes, device) of page runs in layers [start, end), K and V.

    Row order is (layer, K/V, run) on both sides of a transfer, so row i of the source
    list pairs with row i of the destination list.
    """
    slabs = np.arange(layer_start * 2, layer_end * 2, dtype=np.uint64)  # (layer, kv) pairs
    first = np.asarray(starts, dtype=np.uint64)
    size = np.asarray(lengths, dtype=np.uint64) * np.uint64(layout.page_bytes)
    page_bytes, num_pages = np.uint64(layout.page_bytes), np.uint64(layout.num_pages)
    address = np.uint64(layout.address) + (slabs[:, None] * num_pages + first[None, :]) * page_bytes
    rows = np.empty((address.size, 3), dtype=np.uint64)
    rows[:, 0] = address.ravel()
    rows[:, 1] = np.broadcast_to(size, address.shape).ravel()
    rows[:, 2] = layout.device_id
    return rows
