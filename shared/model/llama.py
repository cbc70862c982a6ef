"""Llama (Llama 2/3, SmolLM2, ...): the common decoder with no extras.

Llama 3's rope scaling comes from the config (shared.model.rope); optional attention and
MLP biases too (attention_bias, mlp_bias).
"""

from __future__ import annotations

from shared.model.decoder import DecoderModel, FamilySpec


class LlamaModel(DecoderModel):
    spec = FamilySpec()
