"""Tiny random checkpoints for fast tests (HF-format directories), one builder per family."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from shared.model.loader import resolve_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# model_type -> transformers' config and model classes, and what a tiny one adds by default.
FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),
}


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 49152,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    with_tokenizer: bool = True,
    initializer_range: float = 0.2,
    max_shard_size: str | None = None,
    **config: Any,
) -> Path:
    """Save a random model of `family` (a key of FAMILIES) to `out_dir` and return it.

    The default initializer_range (0.2, not HF's 0.02) makes attention scores and logits
    far from uniform, so rotary/masking bugs change the output visibly. `config` entries
    override the family's config (head_dim, sliding_window, rope_parameters, experts...).
    `max_shard_size` (e.g. "200KB") saves a sharded checkpoint. With `with_tokenizer`, the
    default model's tokenizer files are copied so a gateway can serve the checkpoint (this
    converts the default GGUF once if it is not cached yet).
    """
    config_cls, model_cls, family_defaults = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 3,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": initializer_range,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        **family_defaults,
        **config,
    }
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    _randomize_biases_and_head_norms(model, initializer_range)
    if max_shard_size is None:
        model.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out_dir)
    if with_tokenizer:
        src = resolve_model_dir(None)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)
    return out_dir


@torch.no_grad()
def _randomize_biases_and_head_norms(model: PreTrainedModel, std: float) -> None:
    # HF starts biases at 0 and norms at 1: a model that skipped them would still match.
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, std)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            param.normal_(1.0, std)


def build_tiny_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 49152,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    with_tokenizer: bool = True,
    initializer_range: float = 0.2,
) -> Path:
    """Save a random LlamaForCausalLM to `out_dir` and return it (see build_tiny_model)."""
    return build_tiny_model(
        "llama",
        out_dir,
        seed=seed,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        with_tokenizer=with_tokenizer,
        initializer_range=initializer_range,
    )
