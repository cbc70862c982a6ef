"""Model hyper-parameters read from an HF-style directory (plain JSON, no transformers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.model.rope import RopeScaling

# Fallback for configs saved without "architectures" (e.g. config.save_pretrained alone).
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclass(frozen=True)
class MoeConfig:
    """Routed experts of a sparse MLP (Qwen3-MoE naming)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer` routes to experts (otherwise it has a dense MLP)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> MoeConfig | None:
        # transformers 5 saves Qwen3-MoE's num_experts under Mixtral's name.
        num = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        if num <= 0:
            return None
        return cls(
            num_experts=num,
            top_k=int(raw["num_experts_per_tok"]),
            intermediate_size=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
        )


def _layer_windows(raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Sliding-window length of each layer (None: full attention), as transformers reads it."""
    window = raw.get("sliding_window")
    if "use_sliding_window" in raw and not raw["use_sliding_window"]:
        window = None  # Qwen families keep a window in the file but switch it off
    if not window:
        return (None,) * num_layers
    types = raw.get("layer_types")
    if types is None and "max_window_layers" in raw:
        first = int(raw["max_window_layers"])
        types = ["sliding_attention" if i >= first else "full" for i in range(num_layers)]
    if types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    hidden_act: str = "silu"
    attention_bias: bool = False  # bias on q/k/v and o projections (Llama, Qwen3)
    mlp_bias: bool = False
    # Per layer: sliding-window length, or None for full attention. Families that have no
    # sliding window in transformers (Llama) ignore it.
    layer_windows: tuple[int | None, ...] = ()
    moe: MoeConfig | None = None

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
        num_layers = int(raw["num_hidden_layers"])
        max_context = int(raw.get("max_position_embeddings", 2048))
        return cls(
            architecture=str(archs[0]),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_context=max_context,
            # HF's LlamaConfig defaults to untied when the key is absent.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(eos),
            bos_token_id=None if bos is None else int(bos),
            rope_type=str(rope_type),
            rope_scaling=RopeScaling.from_dict(rope, max_context),
            hidden_act=str(raw.get("hidden_act", "silu")),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            layer_windows=_layer_windows(raw, num_layers),
            moe=MoeConfig.from_raw(raw),
        )

    def window_of(self, layer: int) -> int | None:
        """Sliding-window length of `layer`; None for full attention."""
        return self.layer_windows[layer] if self.layer_windows else None

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V for one token across all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem
