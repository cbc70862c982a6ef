"""GGUF-quantised weights kept as their blocks, beside the de-quantised checkpoint.

A GGUF model is converted once to float32 safetensors (loader.py). Its Q4_0, Q4_1 and Q8_0
matrices are also saved as they are stored in the file, rows in the checkpoint's order (the
conversion permutes Llama's q/k rows), so that bfloat16 linears can stream 6 or 9 bits per
weight instead of 16 (kernels/cpu/gguf_linear.cpp). A matrix is saved only if its blocks
de-quantise to exactly the converted tensor: the blocks are the same weights, not a copy
that could drift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

# Sub-directory of a converted model: outside the `*.safetensors` the checkpoint loads.
BLOCKS_DIR = "gguf-blocks"
BLOCKS_FILE = "blocks.safetensors"
# ggml type number -> (name, bytes per block of 32 weights)
BLOCK_TYPES: dict[int, tuple[str, int]] = {2: ("Q4_0", 18), 3: ("Q4_1", 20), 8: ("Q8_0", 34)}
WEIGHTS_PER_BLOCK = 32


@dataclass(frozen=True)
class QuantizedWeight:
    """A [out_features, in_features] matrix as rows of GGUF blocks."""

    ggml_type: int
    blocks: torch.Tensor  # uint8 [out_features, in_features // 32 * block bytes]
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0])

    @staticmethod
    def stack(parts: list[QuantizedWeight | None]) -> QuantizedWeight | None:
        """The rows of several matrices in one (fused q/k/v, gate/up), if all have blocks
        of one type; None otherwise."""
        first = parts[0]
        if first is None:
            return None
        for part in parts:
            if part is None or (part.ggml_type, part.in_features) != (
                first.ggml_type,
                first.in_features,
            ):
                return None
        blocks = torch.cat([p.blocks for p in parts if p is not None])
        return QuantizedWeight(first.ggml_type, blocks, first.in_features)


def save_blocks(gguf_path: Path, state: dict[str, torch.Tensor], out_dir: Path) -> int:
    """Write the blocks of every supported matrix of `gguf_path` that `state` (the converted
    checkpoint) holds; returns how many matrices were saved."""
    import gguf
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch_name = str(reader.fields["general.architecture"].contents())
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    count_field = reader.fields.get(f"{arch_name}.block_count")
    if arch is None or count_field is None:
        return 0
    names = gguf.get_tensor_name_map(arch, int(count_field.contents()))
    tensors = {t.name: t for t in reader.tensors}
    blocks: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for name, weight in state.items():
        if weight.dim() != 2:
            continue
        tensor = tensors.get(names.get_name(name, try_suffixes=(".weight",)) or "")
        if tensor is None or int(tensor.tensor_type) not in BLOCK_TYPES:
            continue
        data = np.asarray(tensor.data)
        values = torch.from_numpy(gguf.quants.dequantize(data, tensor.tensor_type).copy())
        order = _row_order(values, weight)
        if order is None:
            log.info("%s: GGUF blocks do not reproduce the converted weights; not kept", name)
            continue
        blocks[name] = torch.from_numpy(np.ascontiguousarray(data[order]))
        types[name] = str(int(tensor.tensor_type))
    if blocks:
        (out_dir / BLOCKS_DIR).mkdir()
        save_file(blocks, str(out_dir / BLOCKS_DIR / BLOCKS_FILE), metadata=types)
    return len(blocks)


def _row_order(values: torch.Tensor, weight: torch.Tensor) -> np.ndarray | None:
    """Indices `order` with values[order] == weight exactly, or None if there are none."""
    if values.shape != weight.shape:
        return None
    if torch.equal(values, weight):
        return np.arange(values.shape[0])
    rows: dict[bytes, list[int]] = {}
    for i, row in enumerate(values.numpy()):
        rows.setdefault(row.tobytes(), []).append(i)
    order = []
    for row in weight.numpy():
        matches = rows.get(row.tobytes())
        if not matches:
            return None
        order.append(matches.pop())
    return np.array(order)


def load_blocks(model_dir: Path) -> dict[str, QuantizedWeight]:
    """The blocks saved beside a converted checkpoint, by tensor name ({} if none)."""
    path = model_dir / BLOCKS_DIR / BLOCKS_FILE
    if not path.is_file():
        return {}
    out: dict[str, QuantizedWeight] = {}
    with safe_open(str(path), framework="pt") as f:
        types = f.metadata() or {}
        names = f.keys()  # safe_open is not iterable
        for name in names:
            ggml_type = int(types[name])
            data = f.get_tensor(name)
            per_block = BLOCK_TYPES[ggml_type][1]
            in_features = data.shape[1] // per_block * WEIGHTS_PER_BLOCK
            out[name] = QuantizedWeight(ggml_type, data, in_features)
    return out
