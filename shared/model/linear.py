"""Linear layers whose weights are kept in the layout the CPU's matmul reads fastest.

bfloat16 matmuls on the CPU go through oneDNN (AMX or AVX-512 where the CPU has them), which
otherwise reorders the weight into its blocked layout on every call. At decode batch sizes
the weights stream from memory each step, so that reorder is a large part of the step:
packing once at load makes batch-32 decode matmuls ~1.5x faster. Results agree with
F.linear's to bfloat16 rounding (like F.linear, oneDNN may sum in another order for another
batch shape or thread count; tests/unit/test_linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packs(weight: torch.Tensor) -> bool:
    """Whether `weight` gets the packed layout: bfloat16 on a CPU oneDNN handles it on."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linear:
    """y = x @ weight.T + bias. The plain weight is not kept once packed (it would double
    the memory); what reads weights directly keeps its own tensor (the tied embedding)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = packs(weight)
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
            if self.packed
            else weight
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "none", [], ""
            )
            return out
        return F.linear(x, self.weight, self.bias)
