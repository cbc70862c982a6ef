"""Linears over GGUF blocks (kernels/cpu/gguf_linear.cpp): the same weights as the converted
checkpoint, and a bfloat16 matmul's numbers."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from safetensors.torch import load_file

from kernels import cpu_kernels
from shared.model.decoder import DecoderModel
from shared.model.gguf_blocks import BLOCK_TYPES, load_blocks
from shared.model.linear import QUANTIZED_MAX_ROWS
from shared.model.runner import ModelRunner, SeqSlice

TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]
needs_amx = pytest.mark.skipif(
    not cpu_kernels.gguf_linear_supported(), reason="gguf_linear needs a CPU with AMX (bf16)"
)


@pytest.fixture(scope="module", autouse=True)
def _kernels_built() -> None:
    assert cpu_kernels.available(), "CPU kernels did not build (see the log)"


def _quantized(
    qtype: GGMLQuantizationType, out_features: int, in_features: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights quantised by gguf-py: (blocks, gguf-py's float32 de-quantisation)."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).numpy()
    blocks = gguf.quants.quantize(weight, qtype)
    values = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())
    return torch.from_numpy(blocks.copy()), values


def _linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int, bias: torch.Tensor | None):
    packed = cpu_kernels.gguf_pack(blocks, qtype, x.shape[1])
    return cpu_kernels.gguf_linear(x, packed, qtype, blocks.shape[0], bias)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_py(qtype: GGMLQuantizationType) -> None:
    blocks, values = _quantized(qtype, 40, 96)
    assert torch.equal(torch.ops.kvrelay.gguf_dequantize(blocks, int(qtype), 96), values)


@needs_amx
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("out_features", [48, 64])  # 48: a last panel of 16 rows
def test_widened_weights_are_the_bfloat16_weights(
    qtype: GGMLQuantizationType, out_features: int
) -> None:
    blocks, values = _quantized(qtype, out_features, 128)
    packed = cpu_kernels.gguf_pack(blocks, int(qtype), 128)
    widened = torch.ops.kvrelay.gguf_widen(packed, int(qtype), out_features, 128)
    # Bit for bit what transformers multiplies with: float32 values rounded to bfloat16.
    assert torch.equal(widened, values.to(torch.bfloat16))


@needs_amx
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 7, 16, 32, 33, 70])
def test_linear_is_a_bfloat16_matmul(qtype: GGMLQuantizationType, rows: int) -> None:
    blocks, values = _quantized(qtype, 80, 192, seed=rows)
    gen = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, 192, generator=gen).bfloat16()
    bias = torch.randn(80, generator=gen).bfloat16()
    weight = values.bfloat16()
    out = _linear(x, blocks, int(qtype), bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 80)
    exact = x.double() @ weight.double().T + bias.double()
    reference = F.linear(x, weight, bias)
    # No further from the exact sum than torch's bfloat16 matmul (each rounds once).
    ours, theirs = (out.double() - exact).abs().max(), (reference.double() - exact).abs().max()
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)


@needs_amx
@pytest.mark.parametrize("rows", [32, 45])
def test_a_row_does_not_depend_on_the_batch(rows: int) -> None:
    blocks, _ = _quantized(GGMLQuantizationType.Q4_1, 96, 256)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    together = _linear(x, blocks, int(GGMLQuantizationType.Q4_1), None)
    alone = torch.cat([_linear(x[i : i + 1], blocks, 3, None) for i in range(rows)])
    assert torch.equal(together, alone)


def test_bad_blocks_are_refused() -> None:
    blocks, _ = _quantized(GGMLQuantizationType.Q4_1, 32, 64)
    with pytest.raises(RuntimeError, match="bytes per row"):
        cpu_kernels.gguf_pack(blocks, int(GGMLQuantizationType.Q4_1), 96)
    with pytest.raises(RuntimeError, match="not supported"):
        cpu_kernels.gguf_pack(blocks, int(GGMLQuantizationType.Q5_0), 64)
    if cpu_kernels.gguf_linear_supported():
        packed = cpu_kernels.gguf_pack(blocks, 3, 64)
        with pytest.raises(RuntimeError, match="do not hold"):
            cpu_kernels.gguf_linear(torch.zeros(2, 64).bfloat16(), packed, 3, 64, None)
        with pytest.raises(RuntimeError, match="bfloat16"):
            cpu_kernels.gguf_linear(torch.zeros(2, 64), packed, 3, 32, None)


def test_default_model_keeps_blocks_that_are_its_weights(default_model_dir: Path) -> None:
    """Every linear of the default GGUF kept as blocks, rows in the checkpoint's order (q/k
    rows are permuted by the conversion): de-quantised, they are the converted tensors."""
    blocks = load_blocks(default_model_dir)
    state = load_file(str(default_model_dir / "model.safetensors"))
    layers = 30
    assert len(blocks) == 7 * layers + 1  # q k v o gate up down per layer, the embedding
    assert {b.ggml_type for b in blocks.values()} <= set(BLOCK_TYPES)
    for name, weight in blocks.items():
        values = torch.ops.kvrelay.gguf_dequantize(
            weight.blocks, weight.ggml_type, weight.in_features
        )
        assert torch.equal(values, state[name]), name


@needs_amx
def test_default_model_decode_reads_blocks(default_model_dir: Path) -> None:
    """In bfloat16 the default model's decode matmuls read the blocks, with the numbers of
    the packed bfloat16 weights."""
    runner = ModelRunner(default_model_dir, dtype=torch.bfloat16, kv_cache_mb=32)
    assert isinstance(runner.model, DecoderModel)
    linears = runner.model.linears()
    kept = [linear.quantized for linear in linears]
    assert all(k is not None for k in kept)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (5 + i,), generator=gen).tolist() for i in range(4)]
    assert sum(len(p) for p in prompts) <= QUANTIZED_MAX_ROWS  # every matmul reads blocks

    def logits(with_blocks: bool) -> torch.Tensor:
        for linear, k in zip(linears, kept, strict=True):
            linear.quantized = k if with_blocks else None
        pages = [runner.pool.allocate(runner.pool.pages_for(len(p))) for p in prompts]
        try:
            slices = [SeqSlice(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)]
            return runner.forward(slices)
        finally:
            for pg in pages:
                runner.pool.free(pg)

    torch.testing.assert_close(logits(True), logits(False), atol=0.05, rtol=0)
