"""Rotary position embeddings: frequencies for each rope_type that configs name, cos/sin tables.

Formulas follow transformers' modeling_rope_utils, so a checkpoint rotates as it was
trained. Types whose frequencies depend on the running sequence length ("dynamic") are
refused: they would make one sequence's numbers depend on the others in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """The scaling part of a config's rope_parameters (or older rope_scaling)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    @classmethod
    def from_dict(cls, rope: dict[str, Any], max_position_embeddings: int) -> RopeScaling:
        def num(key: str, default: float) -> float:
            value = rope.get(key)
            return default if value is None else float(value)

        def opt(key: str) -> float | None:
            value = rope.get(key)
            return None if value is None else float(value)

        rope_type = str(rope.get("rope_type", rope.get("type", "default")))
        original = rope.get("original_max_position_embeddings")
        factor = rope.get("factor")
        if factor is None and rope_type == "yarn" and original:
            factor = max_position_embeddings / int(original)  # as transformers infers it
        return cls(
            rope_type=rope_type,
            factor=1.0 if factor is None else float(factor),
            original_max_position_embeddings=None if original is None else int(original),
            low_freq_factor=num("low_freq_factor", 1.0),
            high_freq_factor=num("high_freq_factor", 4.0),
            # transformers treats 0 / None as "use the default" for the yarn betas.
            beta_fast=float(rope.get("beta_fast") or 32.0),
            beta_slow=float(rope.get("beta_slow") or 1.0),
            attention_factor=opt("attention_factor"),
            mscale=opt("mscale"),
            mscale_all_dim=opt("mscale_all_dim"),
            truncate=bool(rope.get("truncate", True)),
        )


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling
) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim // 2] (float32) and the factor that scales cos/sin."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = scaling.rope_type
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / scaling.factor, 1.0
    if kind == "llama3":
        return _llama3(base, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    raise NotImplementedError(f"rope_type {kind!r} is not supported (supported: {supported})")


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    if s.original_max_position_embeddings is None:
        raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    if s.original_max_position_embeddings is None:
        raise ValueError("yarn rope scaling needs original_max_position_embeddings")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        original = s.original_max_position_embeddings
        assert original is not None
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # Dimensions that rotate fast keep their frequency (extrapolate); slow ones interpolate.
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rotary_tables(
    head_dim: int,
    theta: float,
    scaling: RopeScaling,
    max_pos: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_pos, head_dim] for the rotate_half layout (frequencies repeated twice)."""
    inv_freq, attention_factor = inverse_frequencies(head_dim, theta, scaling)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * attention_factor, emb.sin() * attention_factor
    return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)
