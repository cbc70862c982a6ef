"""Packed bfloat16 linear layers: F.linear's numbers up to bfloat16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.model.linear import Linear, packs

SHAPES = [(576, 960), (1536, 576), (64, 49152)]


def test_float32_stays_plain() -> None:
    weight = torch.randn(8, 4)
    layer = Linear(weight)
    assert not layer.packed and layer.weight is weight


@pytest.mark.skipif(
    not packs(torch.zeros(1, 1, dtype=torch.bfloat16)), reason="no oneDNN bfloat16 on this CPU"
)
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_packed_matches_plain_at_any_batch_size(in_features: int, out_features: int) -> None:
    gen = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16()
    x = torch.randn(300, in_features, generator=gen).bfloat16()
    for b in (None, bias):
        layer = Linear(weight, b)
        assert layer.packed
        full = layer(x)
        # oneDNN and F.linear may sum in another order; each row is rounded to bfloat16 once.
        torch.testing.assert_close(full, F.linear(x, weight, b), rtol=1.6e-2, atol=1e-2)
        for rows in (1, 3, 16, 32, 33, 100):  # a row's result barely depends on its batch
            torch.testing.assert_close(layer(x[:rows]), full[:rows], rtol=1.6e-2, atol=1e-2)
