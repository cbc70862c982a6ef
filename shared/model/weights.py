"""Reading a checkpoint's tensors: safetensors files (single or sharded), taken by name."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.model.gguf_blocks import QuantizedWeight

# Buffers some older checkpoints carry that our models recompute instead.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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


class Checkpoint:
    """Tensors by name, converted to the model's dtype and device as they are taken.

    Taking pops the entry, so the CPU copy is freed as the model is built, and what is
    left at the end is what the model did not use (`check_all_used`).
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        quantized: dict[str, QuantizedWeight] | None = None,
    ) -> None:
        self.state = state
        self.dtype = dtype
        self.device = device
        self.quantized = quantized or {}

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def take(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return self.state.pop(name).to(dtype=self.dtype, device=self.device)

    def take_quantized(self, name: str) -> QuantizedWeight | None:
        """The GGUF blocks of a matrix, when the checkpoint kept them (gguf_blocks.py)."""
        return self.quantized.pop(name, None)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.state else None

    def take_if(self, present: bool, name: str) -> torch.Tensor | None:
        """The tensor when the config says the model has it (then it must be there)."""
        return self.take(name) if present else None

    def check_all_used(self, architecture: str) -> None:
        # A tensor left over means the config describes another model than the weights
        # (e.g. q/k norms or biases we would silently skip): refuse rather than serve noise.
        left = sorted(k for k in self.state if not k.endswith(_IGNORED_SUFFIXES))
        if left:
            shown = ", ".join(left[:5]) + (" ..." if len(left) > 5 else "")
            raise ValueError(
                f"checkpoint has {len(left)} tensors that {architecture} does not use: {shown}"
            )
