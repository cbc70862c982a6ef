"""flashinfer's paged attention against the torch reference, on the pool's own layout."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import AttentionMetadata, paged_attention
from kernels.torch_attention import torch_paged_attention

# Imports flashinfer: the file is skipped where it is not installed (`kvrelay[cuda]`).
flashinfer_attention = pytest.importorskip("kernels.flashinfer_attention")

pytestmark = pytest.mark.gpu

PAGE_SIZE = 16
NUM_PAGES = 64

STEPS = {
    "prefill": ([0, 0, 0], [37, 16, 5]),
    # A chunk after a cached prefix, a fresh prompt and a decode, in one step.
    "append and mixed": ([20, 0, 33], [7, 12, 1]),
    "decode batch": ([50, 3, 17, 64], [1, 1, 1, 1]),
    "decode one": ([99], [1]),
}


def make_step(
    start_pos: list[int], num_new: list[int], seed: int
) -> tuple[AttentionMetadata, list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(NUM_PAGES, generator=generator).tolist()  # scattered pages
    page_ids, used = [], 0
    for s, n in zip(start_pos, num_new, strict=True):
        count = -(-(s + n) // PAGE_SIZE)
        page_ids.append(order[used : used + count])
        used += count
    meta = AttentionMetadata.build(start_pos, num_new, page_ids, PAGE_SIZE, device="cuda")
    return meta, page_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 128)])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_flashinfer_matches_the_torch_reference(
    step: str, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    start_pos, num_new = STEPS[step]
    meta, _ = make_step(start_pos, num_new, seed=len(step))
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (NUM_PAGES, PAGE_SIZE, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    q = torch.randn(sum(num_new), num_heads, head_dim, device="cuda", generator=generator)
    # Two layers on one plan: the second layer's call reuses the step's plan.
    for _layer in range(2):
        k = torch.randn(shape, device="cuda", generator=generator)
        v = torch.randn(shape, device="cuda", generator=generator)
        expected = torch_paged_attention(q, k, v, meta, scale)
        got = flashinfer_attention.flashinfer_paged_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), meta, scale
        )
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


def test_the_seam_picks_flashinfer_on_cuda_and_float32_stays_exact() -> None:
    meta, _ = make_step([10, 0], [6, 20], seed=1)
    q = torch.randn(26, 8, 64, device="cuda")
    k = torch.randn(NUM_PAGES, PAGE_SIZE, 2, 64, device="cuda")
    v = torch.randn(NUM_PAGES, PAGE_SIZE, 2, 64, device="cuda")
    reference = torch_paged_attention(q, k, v, meta, 0.125)
    # float32: flashinfer does not compute it; the reference path answers, bit for bit.
    assert torch.equal(paged_attention(q, k, v, meta, 0.125), reference)
    bf16 = paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), meta, 0.125)
    torch.testing.assert_close(bf16.float(), reference, atol=3e-2, rtol=3e-2)
