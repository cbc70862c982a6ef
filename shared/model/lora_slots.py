"""Batched LoRA: the adapters one forward may use, stacked per module, applied per token row.

`LoraSlots` keeps `num_slots` adapters on the model's device (--max-loras-per-batch),
their A and B of each targeted module stacked, ranks zero-padded to the largest:

    A[module]: [layers, slots, rank, in_features]
    B[module]: [layers, out_features, slots, rank]

A forward whose rows use k slots multiplies every row by the A of all k slots at once
(one matmul), zeroes the columns of the slots a row does not use (a 0/1 mask), and
multiplies by the B of all k slots (another matmul). Two matmuls per module whatever the
mix of adapters: no loop of whole-model passes per adapter, no per-adapter loop either.
The price is rank x k columns where each row needs rank: small next to the base matmul.
Adapters come into slots as batches need them, least recently used out first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.model.config import ModelConfig
from shared.model.lora import LoraAdapter, module_shapes

# Fused projections of the decoder, in the order of their output columns.
QKV = ("q_proj", "k_proj", "v_proj")
O_PROJ = ("o_proj",)
GATE_UP = ("gate_proj", "up_proj")
DOWN = ("down_proj",)


class AdapterBudget:
    """The distinct adapters of one forward: at most `limit` (the slots)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._uids: set[int] = set()

    def admit(self, adapter: LoraAdapter | None) -> bool:
        """Whether a row with this adapter fits the forward (taking a slot if need be)."""
        if adapter is None or adapter.uid in self._uids:
            return True
        if len(self._uids) >= self.limit:
            return False
        self._uids.add(adapter.uid)
        return True


class LoraSlots:
    """Device-resident adapters, by slot. Used by the engine thread alone (no lock)."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_slots < 1:
            raise ValueError("at least one LoRA slot is needed")
        self.num_layers = config.num_layers
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.shapes = module_shapes(config)
        self.rank = 0  # grows to the largest rank installed
        self.a: dict[str, torch.Tensor] = {}  # module -> [layers, slots, rank, in]
        self.b: dict[str, torch.Tensor] = {}  # module -> [layers, out, slots, rank]
        self._owner: list[int | None] = [None] * num_slots  # adapter uid in each slot
        self._used_at = [0] * num_slots
        self._clock = 0
        self.installs = 0  # adapters copied into a slot so far

    def resident(self) -> list[int | None]:
        return list(self._owner)

    def batch(
        self, adapters: Sequence[LoraAdapter | None], rows: Sequence[int]
    ) -> LoraBatch | None:
        """The LoRA of one forward: sequence i has `rows[i]` token rows, adapter adapters[i].

        None when no row uses an adapter (the forward then skips LoRA entirely).
        """
        distinct: dict[int, LoraAdapter] = {}
        for adapter in adapters:
            if adapter is not None:
                distinct.setdefault(adapter.uid, adapter)
        if not distinct:
            return None
        if len(distinct) > self.num_slots:
            raise ValueError(
                f"{len(distinct)} LoRA adapters in one batch; at most {self.num_slots} "
                "(--max-loras-per-batch)"
            )
        self._clock += 1
        slot_of = {uid: s for s, uid in enumerate(self._owner) if uid in distinct}
        for uid, adapter in distinct.items():
            if uid not in slot_of:
                slot_of[uid] = self._install(adapter, taken=set(slot_of.values()))
        for slot in slot_of.values():
            self._used_at[slot] = self._clock
        seq_slots = [-1 if a is None else slot_of[a.uid] for a in adapters]
        row_slot = torch.repeat_interleave(
            torch.tensor(seq_slots, dtype=torch.long), torch.tensor(list(rows), dtype=torch.long)
        ).to(self.device)
        count = max(slot_of.values()) + 1  # slots [0, count) take part in the matmuls
        onehot = row_slot[:, None] == torch.arange(count, device=self.device)[None, :]
        mask = onehot.to(self.dtype).repeat_interleave(self.rank, dim=1)
        return LoraBatch(self, count, mask)

    def _install(self, adapter: LoraAdapter, taken: set[int]) -> int:
        slot = self._pick_slot(taken)
        if adapter.rank > self.rank:
            self._grow(adapter.rank)
        for module in adapter.modules:
            if module not in self.a:
                in_features, out_features = self.shapes[module]
                layers, slots, rank = self.num_layers, self.num_slots, self.rank
                self.a[module] = self._zeros(layers, slots, rank, in_features)
                self.b[module] = self._zeros(layers, out_features, slots, rank)
        for module in self.a:  # what the slot's previous adapter left
            self.a[module][:, slot].zero_()
            self.b[module][:, :, slot].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            rank = a.shape[0]
            self.a[module][layer, slot, :rank].copy_(a)
            self.b[module][layer, :, slot, :rank].copy_(b)
        self._owner[slot] = adapter.uid
        self.installs += 1
        return slot

    def _pick_slot(self, taken: set[int]) -> int:
        # An empty slot, lowest first (fewer slots in the matmuls), else the least recent.
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        candidates = [s for s in range(self.num_slots) if s not in taken]
        return min(candidates, key=lambda s: self._used_at[s])

    def _grow(self, rank: int) -> None:
        """Pads every slot to a larger rank (a bigger adapter came): zero rows and columns."""
        old = self.rank
        for module in self.a:
            a = self._zeros(*self.a[module].shape[:2], rank, self.a[module].shape[3])
            a[:, :, :old] = self.a[module]
            b = self._zeros(*self.b[module].shape[:3], rank)
            b[..., :old] = self.b[module]
            self.a[module], self.b[module] = a, b
        self.rank = rank

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)


@dataclass
class LoraBatch:
    """The LoRA of one forward: which slot's columns each token row keeps."""

    slots: LoraSlots
    count: int  # slots [0, count) take part
    mask: torch.Tensor  # [rows, count * rank]: 1 on the columns of the row's slot, else 0

    def select(self, rows: torch.Tensor) -> LoraBatch:
        """The same batch restricted to some rows (the decoder's last layer keeps fewer)."""
        return LoraBatch(self.slots, self.count, self.mask.index_select(0, rows))

    def add(self, layer: int, modules: Sequence[str], x: torch.Tensor, out: torch.Tensor) -> None:
        """out += each module's LoRA update of x, in place; `out` holds the modules' outputs
        side by side in the order of `modules` (a fused projection)."""
        slots = self.slots
        width = self.count * slots.rank
        column = 0
        for module in modules:
            out_features = slots.shapes[module][1]
            a = slots.a.get(module)
            if a is not None:
                xa = F.linear(x, a[layer, : self.count].reshape(width, -1))
                xa.mul_(self.mask)
                b = slots.b[module][layer, :, : self.count].reshape(out_features, width)
                out[:, column : column + out_features] += F.linear(xa, b)
            column += out_features
