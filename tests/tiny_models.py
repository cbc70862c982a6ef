"""Tiny random checkpoints for fast tests (HF-format directories)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from shared.model.loader import resolve_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


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
    """Save a random LlamaForCausalLM to `out_dir` and return it.

    The default initializer_range (0.2, not HF's 0.02) makes attention scores and logits
    far from uniform, so rotary/masking bugs change the output visibly. With
    `with_tokenizer`, the default model's tokenizer files are copied so a gateway can serve
    the checkpoint (this converts the default GGUF once if it is not cached yet).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out_dir)
    if with_tokenizer:
        src = resolve_model_dir(None)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)
    return out_dir
