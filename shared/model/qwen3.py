"""Qwen3: RMSNorm over each q and k head before rotary (q_norm, k_norm); biases only with
attention_bias; head_dim set by the config, not hidden_size / heads."""

from __future__ import annotations

from shared.model.decoder import DecoderModel, FamilySpec


class Qwen3Model(DecoderModel):
    spec = FamilySpec(qk_norm=True, sliding_window=True)
