"""Qwen2 / Qwen2.5: biases on q/k/v (not on o), sliding window on the layers the config's
layer_types (or max_window_layers) names when use_sliding_window is on."""

from __future__ import annotations

from shared.model.decoder import DecoderModel, FamilySpec


class Qwen2Model(DecoderModel):
    spec = FamilySpec(qkv_bias=True, sliding_window=True)
