"""LoRA adapters in PEFT's format: read, checked against the model, ready to install.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`
(or `adapter_model.bin`). Each targeted linear layer W (q/k/v/o, gate/up/down, as PEFT
names them) gets a low-rank update: y = x W^T + scale * (x A^T) B^T, scale = alpha / r
(alpha / sqrt(r) with rslora; per-module alpha from `alpha_pattern`, r from the tensors).
The scale is folded into B here, once. What PEFT can do beyond that (DoRA, LoRA biases,
modules_to_save, embedding or lm_head adapters...) is refused rather than half-served.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shared.model.config import ModelConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# Config entries that change what the adapter computes, and the values we can serve.
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "peft_type": ("LORA",),
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, ()),
    "layer_replication": (None,),
    "target_parameters": (None, ()),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
}
_uids = itertools.count(1)


class LoraError(ValueError):
    """An adapter that cannot be served on this model (bad files, unsupported features)."""


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every module an adapter may target."""
    hidden = config.hidden_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _has_dense_mlp(config: ModelConfig, layer: int) -> bool:
    # Routed experts have their own weights per expert: adapters on them are not supported.
    return config.moe is None or not config.moe.is_sparse(layer)


def parse_lora_paths(items: Iterable[str]) -> list[tuple[str, str]]:
    """`name=path` entries (a bare path is named after its folder), as --lora-paths takes."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        pairs.append((name.strip(), path.strip()))
    return pairs


def check_adapter_name(name: str) -> None:
    # ':' separates base model and adapter in a request's "model" ("base:adapter").
    if not name or len(name) > 256 or ":" in name or not name.isprintable() or name != name.strip():
        raise LoraError(
            f"invalid LoRA adapter name {name!r}: 1 to 256 printable characters, no ':' "
            "and no surrounding spaces"
        )


def _pattern_value(patterns: dict[str, Any], module_key: str, default: Any) -> Any:
    # PEFT's rule (get_pattern_key): the first pattern that ends the module's dotted name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise LoraError(f"{path} is not a PEFT adapter: no adapter_config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"{config_file}: {exc}") from None
    if not isinstance(raw, dict):
        raise LoraError(f"{config_file}: not a JSON object")
    for key, allowed in _REQUIRED.items():
        value = raw.get(key)
        if isinstance(value, list):
            value = tuple(value)
        if value not in allowed:
            raise LoraError(f"{config_file}: {key}={raw.get(key)!r} is not supported")
    if int(raw.get("r") or 0) <= 0:
        raise LoraError(f"{config_file}: r must be a positive rank")
    return raw


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in _WEIGHT_FILES:
        weights = path / name
        if weights.is_file():
            try:
                if name.endswith(".safetensors"):
                    return load_file(str(weights), device="cpu"), weights
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as exc:  # a corrupt file: a client's mistake, not a crash
                raise LoraError(f"{weights}: cannot be read: {exc}") from None
            if not isinstance(state, dict):
                raise LoraError(f"{weights}: not a state dict")
            return state, weights
    raise LoraError(f"{path} has no {' or '.join(_WEIGHT_FILES)}")


def _fingerprint(*files: Path) -> str:
    digest = hashlib.blake2b(digest_size=16, person=b"kvrelay-lora-v1")
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One loaded adapter, in host memory; the slots copy it to the model's device."""

    name: str
    path: str
    key: str  # digest of its files: enters the block hashes, so caches never mix adapters
    rank: int  # the largest rank over its modules
    # (layer, module) -> (A [r, in_features], B [out_features, r], B already scaled)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    uid: int  # unique in this process: a reloaded name is another adapter

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.weights)

    @classmethod
    def load(
        cls, name: str, path: str | Path, config: ModelConfig, dtype: torch.dtype
    ) -> LoraAdapter:
        check_adapter_name(name)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise LoraError(f"LoRA adapter path {str(path)!r} is not a directory")
        raw = _read_config(folder)
        state, weights_file = _read_tensors(folder)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for tensor_name, tensor in state.items():
            match = _KEY.match(tensor_name)
            if match is None:
                raise LoraError(f"{weights_file}: tensor {tensor_name!r} is not supported")
            layer, parent, module, side = int(match[1]), match[2], match[3], match[4]
            expected_parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
            if module not in TARGET_MODULES or parent != expected_parent:
                raise LoraError(f"{weights_file}: module {parent}.{module} is not supported")
            if layer >= config.num_layers:
                raise LoraError(f"{weights_file}: layer {layer} of {config.num_layers}")
            if module in MLP_MODULES and not _has_dense_mlp(config, layer):
                raise LoraError(f"{weights_file}: layer {layer} has routed experts, no {module}")
            pairs.setdefault((layer, module), {})[side] = tensor
        if not pairs:
            raise LoraError(f"{weights_file} has no LoRA weights")
        shapes = module_shapes(config)
        alpha = float(raw.get("lora_alpha", 8))  # PEFT's default
        alpha_pattern = raw.get("alpha_pattern") or {}
        rslora = bool(raw.get("use_rslora"))
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for (layer, module), sides in sorted(pairs.items()):
            if set(sides) != {"A", "B"}:
                raise LoraError(f"{weights_file}: layer {layer} {module} lacks lora_A or lora_B")
            a, b = sides["A"], sides["B"]
            rank = a.shape[0]
            in_features, out_features = shapes[module]
            if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
                raise LoraError(
                    f"{weights_file}: layer {layer} {module}: A {tuple(a.shape)} and "
                    f"B {tuple(b.shape)} do not fit ({out_features}, {in_features})"
                )
            parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
            module_key = f"model.layers.{layer}.{parent}.{module}"
            module_alpha = float(_pattern_value(alpha_pattern, module_key, alpha))
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            # Scaled in float32, then stored in the model's dtype (as PEFT's merge rounds).
            weights[(layer, module)] = (
                a.to(torch.float32).to(dtype).contiguous(),
                (b.to(torch.float32) * scale).to(dtype).contiguous(),
            )
        return cls(
            name=name,
            path=str(folder),
            key=_fingerprint(folder / "adapter_config.json", weights_file),
            rank=max(a.shape[0] for a, _ in weights.values()),
            weights=weights,
            uid=next(_uids),
        )
