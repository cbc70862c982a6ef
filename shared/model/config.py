"""Model hyper-parameters read from an HF-style directory (plain JSON, no transformers)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Fallback for configs saved without "architectures" (e.g. config.save_pretrained alone).
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_context: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    rope_type: str = "default"

    @classmethod
    def from_dir(cls, path: Path | str) -> ModelConfig:
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dicts(raw, gen)

    @classmethod
    def from_dicts(cls, raw: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        gen = gen or {}
        archs = raw.get("architectures") or []
        if not archs and raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
            archs = [_ARCH_BY_MODEL_TYPE[raw["model_type"]]]
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # transformers 5 nests rope settings in rope_parameters; older files use rope_theta.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        # eos may be an int or a list in either file; the model stops on any of them.
        eos: list[int] = []
        for src in (raw.get("eos_token_id"), gen.get("eos_token_id")):
            for tok in src if isinstance(src, list) else [src]:
                if tok is not None and int(tok) not in eos:
                    eos.append(int(tok))
        bos = raw.get("bos_token_id", gen.get("bos_token_id"))
        return cls(
            architecture=str(archs[0]),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_context=int(raw.get("max_position_embeddings", 2048)),
            # HF's LlamaConfig defaults to untied when the key is absent.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(eos),
            bos_token_id=None if bos is None else int(bos),
            rope_type=str(rope_type),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V for one token across all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem
