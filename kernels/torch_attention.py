"""Reference paged attention in plain torch (CPU path and the oracle for fused kernels)."""

from __future__ import annotations

from collections.abc import Iterable
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
    window: int | None = None,
    seqs: Iterable[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`window`: a query at position p sees keys p - window + 1 .. p only (sliding window).
    `seqs`: compute only these sequences' rows (of `out`, when given); default all."""
    gqa = q.shape[1] != k_cache.shape[2]
    if seqs is None and meta.decode_only and meta.num_seqs > 1:
        return _decode_batch(q, k_cache, v_cache, meta, scale, gqa, window)
    out = torch.empty_like(q) if out is None else out
    for i in range(meta.num_seqs) if seqs is None else seqs:
        start, n = meta.start_pos[i], meta.num_new[i]
        lo, hi = meta.cu_new[i], meta.cu_new[i + 1]
        total = start + n
        # Keys before the first query's window are out of every query's reach.
        first = 0 if window is None else max(0, start + 1 - window)
        # SDPA layout [1, heads, tokens, head_dim]: with a batch dim the CPU flash kernel
        # is used (3x faster than the math fallback that 3-D inputs get).
        k = gather_kv(k_cache, meta.page_ids[i], total)[first:].transpose(0, 1).unsqueeze(0)
        v = gather_kv(v_cache, meta.page_ids[i], total)[first:].transpose(0, 1).unsqueeze(0)
        qs = q[lo:hi].transpose(0, 1).unsqueeze(0)
        mask: torch.Tensor | None = None
        causal = False
        if n > 1 and start == 0 and (window is None or total <= window):
            causal = True  # square causal: SDPA's built-in (top-left aligned) mask is right
        elif n > 1:
            # Queries sit at the END of the key range: token j (position start+j) sees
            # keys 0..start+j. SDPA's is_causal would align them to the start instead.
            qpos = torch.arange(start, total, device=q.device).unsqueeze(1)
            kpos = torch.arange(first, total, device=q.device).unsqueeze(0)
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
        # n == 1: the single new token is the last position and sees every key kept.
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
    window: int | None = None,
) -> torch.Tensor:
    """One new token per sequence: a single padded SDPA call instead of a per-sequence loop."""
    b, num_pages = meta.page_table.shape
    span = num_pages * k_cache.shape[1]
    flat = meta.page_table.flatten()
    # [b, kv_heads, span, head_dim]; padding pages (page 0) are masked out below.
    k = k_cache.index_select(0, flat).view(b, span, *k_cache.shape[2:]).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(b, span, *v_cache.shape[2:]).transpose(1, 2)
    kpos = torch.arange(span, device=q.device)
    mask = kpos < meta.seq_lens.unsqueeze(1)
    if window is not None:
        mask &= kpos >= meta.seq_lens.unsqueeze(1) - window
    qd = q.unsqueeze(2)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # The CPU flash kernel is several times slower in bfloat16 than in float32 with one
        # query per sequence; the gathered K/V are small, so float32 is the cheaper way.
        qd, k, v = qd.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(
        qd, k, v, attn_mask=mask.view(b, 1, 1, span), scale=scale, enable_gqa=gqa
    )
    return o.squeeze(2).to(q.dtype)
