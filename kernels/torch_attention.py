"""Reference paged attention in plain torch (CPU path and the oracle for fused kernels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kernels.attention import AttentionMetadata


def gather_kv(cache: torch.Tensor, page_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of a sequence's cache, [length, num_kv_heads, head_dim]."""
    page_size = cache.shape[1]
    used = page_ids[: -(-length // page_size)]
    return cache.index_select(0, used).flatten(0, 1)[:length]


def torch_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    gqa = q.shape[1] != k_cache.shape[2]
    if meta.decode_only and meta.num_seqs > 1:
        return _decode_batch(q, k_cache, v_cache, meta, scale, gqa)
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        start, n = meta.start_pos[i], meta.num_new[i]
        lo, hi = meta.cu_new[i], meta.cu_new[i + 1]
        total = start + n
        # SDPA layout [1, heads, tokens, head_dim]: with a batch dim the CPU flash kernel
        # is used (3x faster than the math fallback that 3-D inputs get).
        k = gather_kv(k_cache, meta.page_ids[i], total).transpose(0, 1).unsqueeze(0)
        v = gather_kv(v_cache, meta.page_ids[i], total).transpose(0, 1).unsqueeze(0)
        qs = q[lo:hi].transpose(0, 1).unsqueeze(0)
        mask: torch.Tensor | None = None
        causal = False
        if n > 1 and start == 0:
            causal = True  # square causal: SDPA's built-in (top-left aligned) mask is right
        elif n > 1:
            # Queries sit at the END of the key range: token j (position start+j) sees
            # keys 0..start+j. SDPA's is_causal would align them to the start instead.
            qpos = torch.arange(start, total, device=q.device).unsqueeze(1)
            mask = torch.arange(total, device=q.device).unsqueeze(0) <= qpos
        # n == 1: the single new token is the last position and sees every key.
        o = F.scaled_dot_product_attention(
            qs, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        out[lo:hi] = o[0].transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    gqa: bool,
) -> torch.Tensor:
    """One new token per sequence: a single padded SDPA call instead of a per-sequence loop."""
    b, num_pages = meta.page_table.shape
    span = num_pages * k_cache.shape[1]
    flat = meta.page_table.flatten()
    # [b, kv_heads, span, head_dim]; padding pages (page 0) are masked out below.
    k = k_cache.index_select(0, flat).view(b, span, *k_cache.shape[2:]).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(b, span, *v_cache.shape[2:]).transpose(1, 2)
    mask = torch.arange(span, device=q.device) < meta.seq_lens.unsqueeze(1)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask.view(b, 1, 1, span), scale=scale, enable_gqa=gqa
    )
    return o.squeeze(2)
