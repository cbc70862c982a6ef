"""Linear layers whose weights are kept in the layout the CPU's matmul reads fastest.

bfloat16 matmuls on the CPU go through oneDNN (AMX or AVX-512 where the CPU has them), which
otherwise reorders the weight into its blocked layout on every call. At decode batch sizes
the weights stream from memory each step, so that reorder is a large part of the step:
packing once at load makes batch-32 decode matmuls ~1.5x faster. Results agree with
F.linear's to bfloat16 rounding (like F.linear, oneDNN may sum in another order for another
batch shape or thread count; tests/unit/test_linear.py).

A matrix that came from a GGUF file as Q4_0/Q4_1/Q8_0 blocks (gguf_blocks.py) is also kept
as those blocks: up to QUANTIZED_MAX_ROWS rows (decode batches), where streaming the weight
is the cost, the matmul reads the blocks (2.7x fewer bytes for Q4_1) and widens them to the
same bfloat16 values in registers; larger batches (prefill) are bound by arithmetic, which
oneDNN's packed layout does best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_kernels
from shared.model.gguf_blocks import QuantizedWeight

# Rows up to which a matmul reads the GGUF blocks rather than the packed bfloat16 weight.
QUANTIZED_MAX_ROWS = 32


def packs(weight: torch.Tensor) -> bool:
    """Whether `weight` gets the packed layout: bfloat16 on a CPU oneDNN handles it on."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def reads_blocks(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether linears of this dtype and device read GGUF blocks (kernels/cpu/gguf_linear)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and cpu_kernels.gguf_linear_supported()


@dataclass(frozen=True)
class PackedBlocks:
    """A QuantizedWeight in the layout gguf_linear reads (kernels/cpu/gguf_linear.cpp)."""

    ggml_type: int
    data: torch.Tensor  # uint8, flat
    out_features: int
    in_features: int

    @staticmethod
    def pack(weight: QuantizedWeight) -> PackedBlocks:
        data = cpu_kernels.gguf_pack(weight.blocks, weight.ggml_type, weight.in_features)
        return PackedBlocks(weight.ggml_type, data, weight.out_features, weight.in_features)


class Linear:
    """y = x @ weight.T + bias. The plain weight is not kept once packed (it would double
    the memory); what reads weights directly keeps its own tensor (the tied embedding)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        quantized: QuantizedWeight | None = None,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.quantized = (
            PackedBlocks.pack(quantized)
            if quantized is not None
            and reads_blocks(weight.dtype, weight.device)
            and (quantized.out_features, quantized.in_features) == tuple(weight.shape)
            and quantized.out_features % 16 == 0
            else None
        )
        self.packed = packs(weight)
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
            if self.packed
            else weight
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized
        if q is not None and x.dim() == 2 and x.shape[0] <= QUANTIZED_MAX_ROWS:
            return cpu_kernels.gguf_linear(x, q.data, q.ggml_type, q.out_features, self.bias)
        if self.packed:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "none", [], ""
            )
            return out
        return F.linear(x, self.weight, self.bias)
