"""Feed-forward blocks: the dense SiLU-gated MLP and the routed mixture of experts.

Both take [tokens, hidden] and return [tokens, hidden]. Routing follows transformers'
Qwen3-MoE: softmax over all experts in float32, top-k, optional renormalisation of the
k weights, weights cast back to the model dtype before they scale each expert's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.layer_ops import silu_and_mul
from shared.model.config import MoeConfig
from shared.model.gguf_blocks import QuantizedWeight
from shared.model.linear import Linear
from shared.model.lora_slots import DOWN, GATE_UP, LoraBatch
from shared.model.weights import Checkpoint


def take_gate_up(ckpt: Checkpoint, prefix: str) -> torch.Tensor:
    """[2 * intermediate, hidden]: gate and up stacked, for one matmul."""
    return torch.cat([ckpt.take(f"{prefix}gate_proj.weight"), ckpt.take(f"{prefix}up_proj.weight")])


@dataclass
class DenseMlp:
    gate_up: Linear  # gate and up in one matmul
    down: Linear

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, bias: bool = False) -> DenseMlp:
        gate_b, up_b = (ckpt.take_if(bias, f"{prefix}{n}_proj.bias") for n in ("gate", "up"))
        gate_up_blocks = [ckpt.take_quantized(f"{prefix}{n}_proj.weight") for n in ("gate", "up")]
        return cls(
            gate_up=Linear(
                take_gate_up(ckpt, prefix),
                None if gate_b is None or up_b is None else torch.cat([gate_b, up_b]),
                QuantizedWeight.stack(gate_up_blocks),
            ),
            down=Linear(
                ckpt.take(f"{prefix}down_proj.weight"),
                ckpt.take_if(bias, f"{prefix}down_proj.bias"),
                ckpt.take_quantized(f"{prefix}down_proj.weight"),
            ),
        )

    def __call__(
        self, x: torch.Tensor, lora: LoraBatch | None = None, layer: int = 0
    ) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if lora is not None:
            lora.add(layer, GATE_UP, x, gate_up)
        act = silu_and_mul(gate_up)
        out = self.down(act)
        if lora is not None:
            lora.add(layer, DOWN, act, out)
        return out


@dataclass
class Routing:
    """Which experts each token went to, and with what weight."""

    expert_ids: torch.Tensor  # [tokens, top_k] long
    weights: torch.Tensor  # [tokens, top_k], model dtype


@dataclass
class MoeMlp:
    router_w: torch.Tensor  # [num_experts, hidden]
    gate_up_w: torch.Tensor  # [num_experts, 2 * moe_intermediate, hidden]
    down_w: torch.Tensor  # [num_experts, hidden, moe_intermediate]
    top_k: int
    norm_topk_prob: bool

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, moe: MoeConfig) -> MoeMlp:
        experts = prefix + "experts."
        if experts + "gate_up_proj" in ckpt:
            # transformers' in-memory layout (what a GGUF conversion writes): stacked.
            gate_up, down = ckpt.take(experts + "gate_up_proj"), ckpt.take(experts + "down_proj")
        else:
            # Hub checkpoints: one gate/up/down triple per expert.
            ids = range(moe.num_experts)
            gate_up = torch.stack([take_gate_up(ckpt, f"{experts}{e}.") for e in ids])
            down = torch.stack([ckpt.take(f"{experts}{e}.down_proj.weight") for e in ids])
        want = (moe.num_experts, 2 * moe.intermediate_size)
        if tuple(gate_up.shape[:2]) != want:
            raise ValueError(f"{experts}: expert weights {tuple(gate_up.shape)} do not fit {moe}")
        return cls(ckpt.take(prefix + "gate.weight"), gate_up, down, moe.top_k, moe.norm_topk_prob)

    def route(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.router_w)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(ids, weights.to(x.dtype))

    def mix(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sum of the chosen experts' outputs, weighted; one pass per expert in use."""
        out = torch.zeros_like(x)
        ids = routing.expert_ids
        for expert in torch.unique(ids).tolist():
            rows, slot = torch.where(ids == expert)
            gate, up = F.linear(x.index_select(0, rows), self.gate_up_w[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_w[expert])
            out.index_add_(0, rows, y * routing.weights[rows, slot, None])
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, self.route(x))
