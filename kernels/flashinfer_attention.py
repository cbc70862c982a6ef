"""Paged attention on CUDA through flashinfer's batch prefill and decode wrappers.

The KV pool already has flashinfer's "NHD" paged layout: one layer's K (or V) is
[num_pages, page_size, num_kv_heads, head_dim], and a step's sequences list their pages
in CSR form (indptr, indices, last page length). A step plans once, on its first layer,
and every other layer of the step runs on that plan. Prefill and mixed steps take the
prefill wrapper (causal; new tokens are the last of their sequence, as flashinfer's
append attention aligns them), steps of one new token per sequence the decode wrapper.

flashinfer computes in float16 / bfloat16: a float32 pool keeps the torch path (run GPU
workers with --dtype bfloat16). Sliding windows take the torch path at the seam.
Importing this module imports flashinfer: the seam does so only for CUDA tensors.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import flashinfer
import torch

from kernels.attention import AttentionMetadata
from kernels.torch_attention import torch_paged_attention

WORKSPACE_BYTES = 128 << 20  # flashinfer's scratch space per device (its examples' size)
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class _Plan:
    meta: weakref.ref[AttentionMetadata]  # the step planned (dead once the step is over)
    key: tuple[Any, ...]
    wrapper: Any


class _State(threading.local):
    """Per thread: wrappers hold the plan of the step their thread is running."""

    def __init__(self) -> None:
        self.plan: _Plan | None = None
        self.wrappers: dict[tuple[torch.device, bool], Any] = {}


_state = _State()


def flashinfer_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """paged_attention's contract (see kernels/attention.py), computed by flashinfer."""
    if q.dtype not in FLASHINFER_DTYPES or k_cache.dtype != q.dtype:
        return torch_paged_attention(q, k_cache, v_cache, meta, scale)
    wrapper = _planned(q, k_cache, meta, scale)
    out: torch.Tensor = wrapper.run(q, (k_cache, v_cache))
    return out


def _planned(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> Any:
    num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[2], q.shape[2]
    key = (num_heads, num_kv_heads, head_dim, k_cache.shape[1], q.dtype, scale, q.device)
    plan = _state.plan
    if plan is not None and plan.meta() is meta and plan.key == key:
        return plan.wrapper
    page_size = k_cache.shape[1]
    # Lengths and offsets on the host: plan() schedules from host copies (no device sync).
    num_pages = [len(pages) for pages in meta.page_ids]
    kv_indptr = torch.tensor([0, *num_pages], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    indices = torch.cat(list(meta.page_ids)).to(device=q.device, dtype=torch.int32)
    seq_lens = [s + n for s, n in zip(meta.start_pos, meta.num_new, strict=True)]
    last_page_len = torch.tensor([(n - 1) % page_size + 1 for n in seq_lens], dtype=torch.int32)
    decode = meta.decode_only
    wrapper = _wrapper(q.device, decode)
    if decode:
        wrapper.plan(
            kv_indptr,
            indices,
            last_page_len,
            num_heads,
            num_kv_heads,
            head_dim,
            page_size,
            pos_encoding_mode="NONE",
            q_data_type=q.dtype,
            kv_data_type=k_cache.dtype,
            sm_scale=scale,
        )
    else:
        qo_indptr = torch.tensor(meta.cu_new, dtype=torch.int32)
        wrapper.plan(
            qo_indptr,
            kv_indptr,
            indices,
            last_page_len,
            num_heads,
            num_kv_heads,
            head_dim,
            page_size,
            causal=True,
            q_data_type=q.dtype,
            kv_data_type=k_cache.dtype,
            sm_scale=scale,
        )
    _state.plan = _Plan(weakref.ref(meta), key, wrapper)
    return wrapper


def _wrapper(device: torch.device, decode: bool) -> Any:
    wrapper = _state.wrappers.get((device, decode))
    if wrapper is None:
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        if decode:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        else:
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        _state.wrappers[(device, decode)] = wrapper
    return wrapper
