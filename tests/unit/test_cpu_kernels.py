"""kvrelay's C++ CPU decode attention against the torch reference it replaces."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_kernels
from kernels.attention import AttentionMetadata, paged_attention
from kernels.torch_attention import torch_paged_attention

PAGE = 16


@pytest.fixture(scope="module", autouse=True)
def _kernels_built() -> None:
    # The suite runs where `make install` built them; a machine without a compiler fails
    # here rather than silently testing the torch path twice.
    assert cpu_kernels.available(), "CPU kernels did not build (see the log)"


def _case(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    gen = torch.Generator().manual_seed(seed)
    num_pages = 200
    k_cache = torch.randn(num_pages, PAGE, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, PAGE, kv_heads, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen).tolist()  # scattered pages
    pages = [[perm.pop() for _ in range(-(-n // PAGE))] for n in lengths]
    meta = AttentionMetadata.build([n - 1 for n in lengths], [1] * len(lengths), pages, PAGE)
    # q as the model passes it: a strided view into the fused q/k projection.
    qk = torch.randn(len(lengths), heads + kv_heads, dim, generator=gen).to(dtype)
    return qk[:, :heads], k_cache, v_cache, meta


def _kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    window: int | None = None,
) -> torch.Tensor:
    return cpu_kernels.paged_decode_attention(
        q, k, v, meta.page_table, meta.seq_lens, q.shape[-1] ** -0.5, window
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(9, 3, 64), (14, 2, 64), (8, 8, 128), (4, 2, 24)],  # SmolLM2, Qwen2.5-0.5B, MHA, ragged
)
@pytest.mark.parametrize("window", [None, 20])
def test_float32_equals_reference(heads: int, kv_heads: int, dim: int, window: int | None) -> None:
    q, k, v, meta = _case(torch.float32, heads, kv_heads, dim, [1, 15, 16, 17, 40, 161])
    ref = torch_paged_attention(q, k, v, meta, dim**-0.5, window)
    torch.testing.assert_close(_kernel(q, k, v, meta, window), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_rounding(dtype: torch.dtype) -> None:
    """Accumulates in float32: equals float32 attention over the same half-precision values,
    up to the rounding of the result."""
    q, k, v, meta = _case(dtype, 9, 3, 64, [3, 33, 100, 250])
    out = _kernel(q, k, v, meta)
    assert out.dtype == dtype
    ref = torch_paged_attention(q.float(), k.float(), v.float(), meta, 64**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_a_row_does_not_depend_on_its_batch() -> None:
    """Each sequence is computed on its own: bitwise the same alone or among others."""
    lengths = [5, 77, 130, 16, 201]
    q, k, v, meta = _case(torch.bfloat16, 9, 3, 64, lengths, seed=3)
    batch = _kernel(q, k, v, meta)
    for i, n in enumerate(lengths):
        alone = AttentionMetadata.build([n - 1], [1], [meta.page_ids[i].tolist()], PAGE)
        assert torch.equal(_kernel(q[i : i + 1], k, v, alone)[0], batch[i])


def test_mixed_step_decodes_with_the_kernel() -> None:
    """In a step that also carries a prefill chunk, the decode rows get the kernel's numbers
    (as in a pure decode step) and the prefill rows the reference's."""
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(64, PAGE, 2, 32, generator=gen)
    v_cache = torch.randn(64, PAGE, 2, 32, generator=gen)
    pages = [[3, 9, 20], [1, 2], [40, 41, 42, 43]]
    meta = AttentionMetadata.build([30, 5, 40], [1, 12, 1], pages, PAGE)
    q = torch.randn(14, 4, 32, generator=gen)
    out = paged_attention(q, k_cache, v_cache, meta, 32**-0.5)
    decode_rows = [0, 13]
    decode = AttentionMetadata.build([30, 40], [1, 1], [pages[0], pages[2]], PAGE)
    assert torch.equal(out[decode_rows], _kernel(q[decode_rows], k_cache, v_cache, decode))
    ref = torch_paged_attention(q, k_cache, v_cache, meta, 32**-0.5)
    assert torch.equal(out[1:13], ref[1:13])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_rejects_mismatched_inputs() -> None:
    q, k, v, meta = _case(torch.float32, 9, 3, 64, [10, 20])
    with pytest.raises(RuntimeError, match="share a dtype"):
        _kernel(q.bfloat16(), k, v, meta)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        _kernel(q[:, :8], k, v, meta)
