"""Llama forward pass over a flattened varlen batch, reading/writing the paged KV pool.

Weights are plain tensors loaded from safetensors (no transformers modeling code). Numerics
follow the HF reference: RMSNorm in float32, rotary with the rotate_half layout, SiLU MLP.
q/k/v and gate/up projections are fused into single matmuls for CPU speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kernels.attention import AttentionMetadata, paged_attention, store_kv
from shared.model.config import ModelConfig


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, single-file or sharded (model.safetensors.index.json)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(model_dir / name), device="cpu"))
    return state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, then scale in the model dtype (as HF).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_tables(
    head_dim: int, theta: float, max_pos: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_pos, head_dim] for the rotate_half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LlamaLayer:
    attn_norm: torch.Tensor
    qkv_w: torch.Tensor  # [(H + 2*KVH) * head_dim, hidden]
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up_w: torch.Tensor  # [2 * intermediate, hidden]
    down_w: torch.Tensor


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        """Build from a checkpoint state dict (consumed: entries are popped to save memory)."""
        if config.rope_type != "default":
            raise NotImplementedError(f"rope_type {config.rope_type!r} is not supported yet")
        if config.num_heads % config.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            return state.pop(name).to(dtype=dtype, device=self.device)

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in state else None

        def cat_opt(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            present = [p for p in parts if p is not None]
            return torch.cat(present) if len(present) == len(parts) else None

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[LlamaLayer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            qkv_b = cat_opt([maybe(a + f"{n}_proj.bias") for n in "qkv"])
            self.layers.append(
                LlamaLayer(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv_w=torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
                    qkv_b=qkv_b,
                    o_w=take(a + "o_proj.weight"),
                    o_b=maybe(a + "o_proj.bias"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up_w=torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")]),
                    down_w=take(m + "down_proj.weight"),
                )
            )
        self.norm = take("model.norm.weight")
        # Tied checkpoints usually omit lm_head; when present it equals the embedding.
        head = maybe("lm_head.weight")
        if head is None and not config.tie_word_embeddings:
            raise KeyError("checkpoint is missing tensor 'lm_head.weight'")
        self.lm_head = self.embed if config.tie_word_embeddings or head is None else head
        self.cos, self.sin = rotary_tables(
            config.head_dim, config.rope_theta, config.max_context, dtype, self.device
        )
        self.scale = config.head_dim**-0.5

    @classmethod
    def from_dir(
        cls,
        model_dir: Path | str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LlamaModel:
        model_dir = Path(model_dir)
        return cls(ModelConfig.from_dir(model_dir), load_safetensors(model_dir), dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv: torch.Tensor,
        last_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Run new tokens through the model, storing their K/V in `kv`'s pages.

        input_ids: [total_new] flattened over sequences (layout in `meta`);
        kv: the pool tensor [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim];
        last_idx: [num_seqs] index into input_ids of each sequence's last new token.
        Returns float32 logits [num_seqs, vocab].
        """
        cfg = self.config
        t = input_ids.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qk_dim = (nh + nkv) * hd
        eps = cfg.rms_norm_eps
        last_layer = len(self.layers) - 1
        # One table lookup per step, shared by all layers; broadcasts over heads.
        cos = self.cos.index_select(0, meta.positions).unsqueeze(1)
        sin = self.sin.index_select(0, meta.positions).unsqueeze(1)

        h = F.embedding(input_ids, self.embed)
        for li, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, eps)
            qkv = F.linear(x, layer.qkv_w, layer.qkv_b)
            # Rotate q and k heads together in one pass.
            qk = apply_rotary(qkv[:, :qk_dim].view(t, nh + nkv, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, qk_dim:].view(t, nkv, hd)
            k_cache, v_cache = kv[li, 0], kv[li, 1]
            store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale).reshape(t, nh * hd)
            if li == last_layer:
                # From here on rows are independent: only each sequence's last token matters.
                h, attn = h.index_select(0, last_idx), attn.index_select(0, last_idx)
            h = h + F.linear(attn, layer.o_w, layer.o_b)

            x = rms_norm(h, layer.mlp_norm, eps)
            gate, up = F.linear(x, layer.gate_up_w).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down_w)

        h = rms_norm(h, self.norm, eps)
        return F.linear(h, self.lm_head).float()
