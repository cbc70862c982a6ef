"""Seam for a decoder layer's elementwise steps: fused C++ kernels on the CPU, torch elsewhere.

Each function has its torch reference here (the CUDA path and the oracle of
tests/unit/test_layer_ops.py); on the CPU, where kvrelay's kernels are built
(kernels/cpu_kernels.py), one pass replaces the several torch ops of each step, which at
decode batch sizes cost more in dispatch than in arithmetic. Both follow transformers' op
order and round intermediates to the model dtype where it does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_kernels
from kernels.attention import store_kv


def _fused(x: torch.Tensor) -> bool:
    # KVRELAY_CPU_KERNELS=0 (kernels/cpu_kernels.py) turns these off with the attention kernel.
    return x.device.type == "cpu" and cpu_kernels.available()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, then scale in the model dtype (as HF).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm of `residual` after `residual += add` (in place, when `add` is given).

    residual: [rows, hidden], updated in place; weight: [hidden]."""
    if _fused(residual) and residual.is_contiguous():
        out: torch.Tensor = torch.ops.kvrelay.add_rms_norm(residual, add, weight, eps)
        return out
    if add is not None:
        residual.add_(add)
    return rms_norm_reference(residual, weight, eps)


@dataclass
class Rotary:
    """One step's rotary inputs: the model's cos/sin tables and each new token's position."""

    cos_table: torch.Tensor  # [max_pos, head_dim], model dtype
    sin_table: torch.Tensor
    positions: torch.Tensor  # [tokens] int64

    @functools.cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at each position, [tokens, 1, head_dim]: broadcast over heads."""
        cos = self.cos_table.index_select(0, self.positions).unsqueeze(1)
        return cos, self.sin_table.index_select(0, self.positions).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_store(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotary: Rotary,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Rotate the q and k heads of qk [tokens, heads + kv_heads, dim], store k and v
    [tokens, kv_heads, dim] in their cache slots; return the rotated q [tokens, heads, dim]."""
    if _fused(qk):
        q: torch.Tensor = torch.ops.kvrelay.rotary_store(
            qk,
            v,
            rotary.cos_table,
            rotary.sin_table,
            rotary.positions,
            slots,
            k_cache,
            v_cache,
            heads,
        )
        return q
    qk = apply_rotary(qk, *rotary.cos_sin)
    store_kv(k_cache, v_cache, qk[:, heads:], v, slots)
    return qk[:, :heads]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [rows, 2 * intermediate] (gate first)."""
    if _fused(gate_up):
        out: torch.Tensor = torch.ops.kvrelay.silu_and_mul(gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
