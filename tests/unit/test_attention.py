from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import AttentionMetadata, paged_attention, store_kv

PAGE = 4
KV_HEADS, HEADS, DIM = 2, 6, 8


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention over a full sequence, [L, heads, dim] in and out."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize(
    "shape",
    [
        [(0, 9), (0, 1), (0, 16), (0, 5)],  # prefill only, page-aligned and ragged
        [(7, 1), (16, 1), (3, 1), (30, 1)],  # batched decode
        [(5, 6), (0, 13), (12, 1), (8, 9)],  # chunked prefill after a cached prefix, mixed
    ],
)
def test_paged_matches_dense(shape: list[tuple[int, int]]) -> None:
    gen = torch.Generator().manual_seed(0)
    num_pages = 64
    k_cache = torch.zeros(num_pages, PAGE, KV_HEADS, DIM)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_pages, generator=gen).tolist()  # scattered, out-of-order pages
    scale = DIM**-0.5

    starts, news, pages, full_q, full_k, full_v = [], [], [], [], [], []
    for start, new in shape:
        total = start + new
        q = torch.randn(total, HEADS, DIM, generator=gen)
        k = torch.randn(total, KV_HEADS, DIM, generator=gen)
        v = torch.randn(total, KV_HEADS, DIM, generator=gen)
        seq_pages = [perm.pop() for _ in range(-(-total // PAGE) + 1)]  # one spare page
        if start:  # the cached prefix, written by an earlier step
            prior = AttentionMetadata.build([0], [start], [seq_pages], PAGE)
            store_kv(k_cache, v_cache, k[:start], v[:start], prior.slot_mapping)
        starts.append(start)
        news.append(new)
        pages.append(seq_pages)
        full_q.append(q)
        full_k.append(k)
        full_v.append(v)

    meta = AttentionMetadata.build(starts, news, pages, PAGE)
    new_q = torch.cat([q[s:] for q, s in zip(full_q, starts, strict=True)])
    new_k = torch.cat([k[s:] for k, s in zip(full_k, starts, strict=True)])
    new_v = torch.cat([v[s:] for v, s in zip(full_v, starts, strict=True)])
    store_kv(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
    out = paged_attention(new_q, k_cache, v_cache, meta, scale)

    assert out.shape == new_q.shape
    for i, start in enumerate(starts):
        ref = dense_causal(full_q[i], full_k[i], full_v[i], scale)[start:]
        got = out[meta.cu_new[i] : meta.cu_new[i + 1]]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # Every token's K sits at page_ids[p // PAGE], offset p % PAGE.
        for p in range(start + news[i]):
            assert torch.equal(k_cache[pages[i][p // PAGE], p % PAGE], full_k[i][p])
            assert torch.equal(v_cache[pages[i][p // PAGE], p % PAGE], full_v[i][p])


def test_metadata_layout() -> None:
    meta = AttentionMetadata.build([5, 0], [3, 2], [[7, 2, 9], [4]], page_size=4)
    assert meta.cu_new == [0, 3, 5]
    assert meta.positions.tolist() == [5, 6, 7, 0, 1]
    # positions 5,6,7 -> page 2 (index 1), offsets 1,2,3; positions 0,1 -> page 4.
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 16, 17]


def test_batched_decode_in_bfloat16_matches_float32() -> None:
    """bfloat16 caches: the decode path (computed in float32 on CPU) returns bfloat16 values
    equal to float32 attention over the same bfloat16 numbers, within bfloat16 rounding."""
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 16, 3, 30]
    pages = [[4 * i + j for j in range(-(-n // PAGE))] for i, n in enumerate([16, 16, 4, 32])]
    k_cache = torch.randn(40, PAGE, KV_HEADS, DIM, generator=gen).bfloat16()
    v_cache = torch.randn(40, PAGE, KV_HEADS, DIM, generator=gen).bfloat16()
    q = torch.randn(len(lengths), HEADS, DIM, generator=gen).bfloat16()
    meta = AttentionMetadata.build([n - 1 for n in lengths], [1] * len(lengths), pages, PAGE)
    scale = DIM**-0.5
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    ref = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
