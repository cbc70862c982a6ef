"""Fused CPU layer ops against their torch references (transformers' op order).

Both round every intermediate to the model dtype at the same points, so results agree to
the last bit but where a float32 sum is ordered differently (the norm's mean of squares):
there an element may move by one unit in its last place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_kernels
from kernels.attention import store_kv
from kernels.layer_ops import Rotary, apply_rotary, rms_norm_reference

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _kernels_built() -> None:
    assert cpu_kernels.available(), "CPU kernels did not build (see the log)"


def _assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    ulp = 2**-7 if got.dtype == torch.bfloat16 else 1e-6  # float32: a few units
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=ulp)
    assert (got != ref).float().mean() < 0.01 or got.dtype == torch.float32


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 37])
def test_add_rms_norm(dtype: torch.dtype, rows: int) -> None:
    h, add = _rand(rows, 576, dtype=dtype, seed=1), _rand(rows, 576, dtype=dtype, seed=2)
    weight = _rand(576, dtype=torch.float32, seed=3).abs().add(0.5).to(dtype)
    expected_residual = h + add
    ref = rms_norm_reference(expected_residual, weight, 1e-5)

    residual = h.clone()
    out = torch.ops.kvrelay.add_rms_norm(residual, add, weight, 1e-5)
    assert torch.equal(residual, expected_residual)  # updated in place
    _assert_matches(out, ref)

    unchanged = h.clone()
    out = torch.ops.kvrelay.add_rms_norm(unchanged, None, weight, 1e-5)
    assert torch.equal(unchanged, h)
    _assert_matches(out, rms_norm_reference(h, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gate_up = _rand(19, 2 * 1536, dtype=dtype, seed=4) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    _assert_matches(torch.ops.kvrelay.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_store(dtype: torch.dtype) -> None:
    heads, kv_heads, dim, tokens = 9, 3, 64, 23
    qkv = _rand(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=5)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    gen = torch.Generator().manual_seed(6)
    rotary = Rotary(
        _rand(300, dim, dtype=dtype, seed=7),
        _rand(300, dim, dtype=dtype, seed=8),
        torch.randint(0, 300, (tokens,), generator=gen),
    )
    slots = torch.randperm(40 * 16, generator=gen)[:tokens]
    ref_k, ref_v = (
        torch.zeros(40, 16, kv_heads, dim, dtype=dtype),
        torch.zeros(40, 16, kv_heads, dim, dtype=dtype),
    )
    rotated = apply_rotary(qk, *rotary.cos_sin)
    store_kv(ref_k, ref_v, rotated[:, heads:], v, slots)

    k_cache, v_cache = torch.zeros_like(ref_k), torch.zeros_like(ref_v)
    q = torch.ops.kvrelay.rotary_store(
        qk, v, rotary.cos_table, rotary.sin_table, rotary.positions, slots, k_cache, v_cache, heads
    )
    assert torch.equal(q, rotated[:, :heads])
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_rotary_store_rejects_mixed_dtypes() -> None:
    qk = torch.zeros(2, 4, 8)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.kvrelay.rotary_store(
            qk,
            torch.zeros(2, 1, 8),
            torch.zeros(10, 8, dtype=torch.bfloat16),
            torch.zeros(10, 8),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(4, 2, 1, 8),
            torch.zeros(4, 2, 1, 8),
            3,
        )
