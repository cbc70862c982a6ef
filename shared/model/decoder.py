"""One decoder-only transformer for every supported family, over the paged KV pool.

Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE share their layout (pre-norm RMSNorm blocks,
rotary attention with grouped KV heads, SiLU-gated MLP) and their tensor names; what sets
them apart is a short `FamilySpec` (plus what the config says: biases, sliding windows,
rope scaling, experts). Weights are plain tensors loaded from safetensors (no transformers
modeling code); numerics follow transformers' op order: RMSNorm in float32, rotary with the
rotate_half layout. q/k/v and gate/up projections are fused into single matmuls for speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from kernels.attention import AttentionMetadata, paged_attention
from kernels.layer_ops import Rotary, add_rms_norm, rms_norm_reference, rotary_store
from shared.model.config import ModelConfig
from shared.model.gguf_blocks import QuantizedWeight, load_blocks
from shared.model.linear import Linear, reads_blocks
from shared.model.lora_slots import O_PROJ, QKV, LoraBatch
from shared.model.mlp import DenseMlp, MoeMlp
from shared.model.rope import rotary_tables
from shared.model.weights import Checkpoint, load_safetensors


@dataclass(frozen=True)
class FamilySpec:
    """What a family adds to the common decoder, as transformers' modeling file has it."""

    qkv_bias: bool = False  # q/k/v biases whatever the config says (Qwen2)
    qk_norm: bool = False  # RMSNorm over each q and k head before rotary (Qwen3)
    sliding_window: bool = False  # honours the config's sliding window (Llama does not)
    moe: bool = False  # sparse layers route to experts (config's num_experts...)


@dataclass
class DecoderLayer:
    attn_norm: torch.Tensor
    qkv: Linear  # [(H + 2*KVH) * head_dim, hidden]
    qk_norm: torch.Tensor | None  # [H + KVH, head_dim]: q_norm for q heads, k_norm for k
    o: Linear
    mlp_norm: torch.Tensor
    mlp: DenseMlp | MoeMlp
    window: int | None  # sliding-window length, None for full attention


class DecoderModel:
    """A family is a subclass that sets `spec`; the registry maps architectures to them."""

    spec: ClassVar[FamilySpec] = FamilySpec()

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        quantized: dict[str, QuantizedWeight] | None = None,
    ) -> None:
        """Build from a checkpoint state dict (consumed: entries are popped to save memory),
        with the GGUF blocks of its matrices where the conversion kept them."""
        if config.num_heads % config.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported")
        if self.spec.moe and config.moe is None:
            raise ValueError(f"{config.architecture} config has no experts (num_experts)")
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        ckpt = Checkpoint(state, dtype, self.device, quantized)
        self.embed = ckpt.take("model.embed_tokens.weight")
        self.layers = [self._load_layer(ckpt, i) for i in range(config.num_layers)]
        self.norm = ckpt.take("model.norm.weight")
        # Tied checkpoints usually omit lm_head; when present it equals the embedding.
        head = ckpt.maybe("lm_head.weight")
        if head is None and not config.tie_word_embeddings:
            raise KeyError("checkpoint is missing tensor 'lm_head.weight'")
        tied = config.tie_word_embeddings or head is None
        self.lm_head = Linear(
            self.embed if tied or head is None else head,
            quantized=ckpt.take_quantized(
                "model.embed_tokens.weight" if tied else "lm_head.weight"
            ),
        )
        ckpt.check_all_used(config.architecture)
        self.cos, self.sin = rotary_tables(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_context,
            dtype,
            self.device,
        )
        self.scale = config.head_dim**-0.5
        # Routed experts (SGLang's return_routed_experts): with `record_routing` on, every
        # forward leaves in `routed_experts` the experts each new token went to, per layer:
        # [total_new, num_layers, top_k] int32, -1 in layers with a dense MLP.
        self.record_routing = False
        self.routed_experts: torch.Tensor | None = None

    def _load_layer(self, ckpt: Checkpoint, i: int) -> DecoderLayer:
        cfg, spec = self.config, self.spec
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv_bias = spec.qkv_bias or cfg.attention_bias
        biases = [ckpt.take_if(qkv_bias, f"{a}{n}_proj.bias") for n in "qkv"]
        qk_norm = None
        if spec.qk_norm:
            # One weight row per head, so q and k heads are normalised in one pass.
            q_norm, k_norm = ckpt.take(a + "q_norm.weight"), ckpt.take(a + "k_norm.weight")
            qk_norm = torch.cat(
                [q_norm.expand(cfg.num_heads, -1), k_norm.expand(cfg.num_kv_heads, -1)]
            )
        mlp: DenseMlp | MoeMlp
        if spec.moe and cfg.moe is not None and cfg.moe.is_sparse(i):
            mlp = MoeMlp.load(ckpt, p + "mlp.", cfg.moe)
        else:
            mlp = DenseMlp.load(ckpt, p + "mlp.", bias=cfg.mlp_bias)
        return DecoderLayer(
            attn_norm=ckpt.take(p + "input_layernorm.weight"),
            qkv=Linear(
                torch.cat([ckpt.take(f"{a}{n}_proj.weight") for n in "qkv"]),
                torch.cat([b for b in biases if b is not None]) if qkv_bias else None,
                QuantizedWeight.stack([ckpt.take_quantized(f"{a}{n}_proj.weight") for n in "qkv"]),
            ),
            qk_norm=qk_norm,
            o=Linear(
                ckpt.take(a + "o_proj.weight"),
                ckpt.take_if(cfg.attention_bias, a + "o_proj.bias"),
                ckpt.take_quantized(a + "o_proj.weight"),
            ),
            mlp_norm=ckpt.take(p + "post_attention_layernorm.weight"),
            mlp=mlp,
            window=cfg.window_of(i) if spec.sliding_window else None,
        )

    @classmethod
    def from_dir(
        cls,
        model_dir: Path | str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> DecoderModel:
        model_dir = Path(model_dir)
        config, state = ModelConfig.from_dir(model_dir), load_safetensors(model_dir)
        quantized = load_blocks(model_dir) if reads_blocks(dtype, torch.device(device)) else {}
        return cls(config, state, dtype, device, quantized)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv: torch.Tensor,
        last_idx: torch.Tensor,
        lora: LoraBatch | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Run new tokens through the model, storing their K/V in `kv`'s pages.

        input_ids: [total_new] flattened over sequences (layout in `meta`);
        kv: the pool tensor [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim];
        last_idx: [num_seqs] index into input_ids of each sequence's last new token;
        lora: the LoRA adapters of the rows, if any row has one.
        Returns float32 logits [num_seqs, vocab]; with `hidden`, the final-norm hidden
        states at last_idx instead (float32 [len(last_idx), hidden]: embeddings).
        """
        cfg = self.config
        t = input_ids.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qk_dim = (nh + nkv) * hd
        eps = cfg.rms_norm_eps
        # Recording needs every token through the last MLP, not only each sequence's last.
        routed = self._routing_buffer(t)
        last_layer = -1 if routed is not None else len(self.layers) - 1
        rotary = Rotary(self.cos, self.sin, meta.positions)

        h = F.embedding(input_ids, self.embed)
        # The residual stream: each block's output is added into h by the next norm (fused).
        block_out: torch.Tensor | None = None
        for li, layer in enumerate(self.layers):
            x = add_rms_norm(h, block_out, layer.attn_norm, eps)
            qkv = layer.qkv(x)
            if lora is not None:
                lora.add(li, QKV, x, qkv)
            qk = qkv[:, :qk_dim].view(t, nh + nkv, hd)
            if layer.qk_norm is not None:
                qk = rms_norm_reference(qk, layer.qk_norm, eps)
            v = qkv[:, qk_dim:].view(t, nkv, hd)
            k_cache, v_cache = kv[li, 0], kv[li, 1]
            # Rotate q and k heads together in one pass, k and v into their pages.
            q = rotary_store(qk, v, rotary, meta.slot_mapping, k_cache, v_cache, nh)
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale, layer.window)
            attn = attn.reshape(t, nh * hd)
            if li == last_layer:
                # From here on rows are independent: only each sequence's last token matters.
                h, attn = h.index_select(0, last_idx), attn.index_select(0, last_idx)
                lora = lora.select(last_idx) if lora is not None else None
            o = layer.o(attn)
            if lora is not None:
                lora.add(li, O_PROJ, attn, o)
            x = add_rms_norm(h, o, layer.mlp_norm, eps)
            if isinstance(layer.mlp, MoeMlp):
                routing = layer.mlp.route(x)
                if routed is not None:
                    routed[:, li] = routing.expert_ids
                block_out = layer.mlp.mix(x, routing)
            else:
                block_out = layer.mlp(x, lora, li)

        if routed is not None and block_out is not None:
            self.routed_experts = routed
            h = (h + block_out).index_select(0, last_idx)
            block_out = None
        h = add_rms_norm(h, block_out, self.norm, eps)
        if hidden:
            return h.float()
        return self.lm_head(h).float()

    def linears(self) -> list[Linear]:
        """Every matmul weight of the model (the routed experts' aside)."""
        out = [self.lm_head]
        for layer in self.layers:
            out += [layer.qkv, layer.o]
            if isinstance(layer.mlp, DenseMlp):
                out += [layer.mlp.gate_up, layer.mlp.down]
        return out

    def linears_reading_blocks(self) -> int:
        """How many matmuls read GGUF blocks at decode batches (shared/model/linear.py)."""
        return sum(linear.quantized is not None for linear in self.linears())

    def _routing_buffer(self, num_tokens: int) -> torch.Tensor | None:
        moe = self.config.moe
        if not self.record_routing or moe is None or not self.spec.moe:
            return None
        shape = (num_tokens, self.config.num_layers, moe.top_k)
        return torch.full(shape, -1, dtype=torch.int32, device=self.device)
