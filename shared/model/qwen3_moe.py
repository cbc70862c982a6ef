"""Qwen3-MoE: Qwen3's attention with routed experts in the sparse layers (every
decoder_sparse_step-th layer not in mlp_only_layers; the others keep a dense MLP)."""

from __future__ import annotations

from shared.model.decoder import DecoderModel, FamilySpec


class Qwen3MoeModel(DecoderModel):
    spec = FamilySpec(qk_norm=True, sliding_window=True, moe=True)
