"""Architecture name (config.json "architectures") -> our model implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from kernels.attention import AttentionMetadata
from shared.model.config import ModelConfig
from shared.model.llama import LlamaModel
from shared.model.lora_slots import LoraBatch
from shared.model.mistral import MistralModel
from shared.model.qwen2 import Qwen2Model
from shared.model.qwen3 import Qwen3Model
from shared.model.qwen3_moe import Qwen3MoeModel


class CausalLM(Protocol):
    """What the runner needs from a model family."""

    config: ModelConfig

    @classmethod
    def from_dir(
        cls, model_dir: Path | str, dtype: torch.dtype = ..., device: str | torch.device = ...
    ) -> CausalLM: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv: torch.Tensor,
        last_idx: torch.Tensor,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor: ...


MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaModel,
    "MistralForCausalLM": MistralModel,
    "Qwen2ForCausalLM": Qwen2Model,
    "Qwen3ForCausalLM": Qwen3Model,
    "Qwen3MoeForCausalLM": Qwen3MoeModel,
}


def load_model(
    model_dir: Path | str, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> CausalLM:
    arch = ModelConfig.from_dir(model_dir).architecture
    cls = MODEL_REGISTRY.get(arch)
    if cls is None:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unsupported model architecture {arch!r} (supported: {supported})")
    return cls.from_dir(model_dir, dtype=dtype, device=device)
