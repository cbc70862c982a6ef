"""Mistral: Llama's layout with a sliding attention window on every layer (config's
sliding_window; null in later Mistral releases, which then attend over everything)."""

from __future__ import annotations

from shared.model.decoder import DecoderModel, FamilySpec


class MistralModel(DecoderModel):
    spec = FamilySpec(sliding_window=True)
