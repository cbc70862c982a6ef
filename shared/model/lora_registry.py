"""The LoRA adapters a worker serves, by name, and the device slots its forwards use.

Loading reads and checks the files on the caller's thread; the engine thread copies an
adapter into a slot when a batch first needs it. Requests hold the adapter object itself,
so unloading a name only stops new requests: those already running finish with the
weights they started with, and a name loaded again is another adapter (another key).
"""

from __future__ import annotations

import threading

import torch

from shared.model.config import ModelConfig
from shared.model.lora import LoraAdapter, LoraError
from shared.model.lora_slots import AdapterBudget, LoraSlots


class LoraAdapterExists(LoraError):
    """The name is taken by an adapter with other weights."""


class LoraRegistry:
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_loras_per_batch: int = 8,
        max_rank: int = 0,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.max_loras_per_batch = max_loras_per_batch
        self.max_rank = max_rank  # 0: any rank (slots grow to the largest)
        self.slots = LoraSlots(config, max_loras_per_batch, dtype, device)
        self._adapters: dict[str, LoraAdapter] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str) -> LoraAdapter:
        """Reads an adapter and serves it under `name`; the same files again are a no-op."""
        adapter = LoraAdapter.load(name, path, self.config, self.dtype)
        if self.max_rank and adapter.rank > self.max_rank:
            raise LoraError(
                f"LoRA adapter {name!r} has rank {adapter.rank}, more than --max-lora-rank "
                f"{self.max_rank}"
            )
        with self._lock:
            current = self._adapters.get(name)
            if current is not None:
                if current.key == adapter.key:
                    return current
                raise LoraAdapterExists(
                    f"a LoRA adapter named {name!r} is already loaded (from {current.path}); "
                    "unload it first"
                )
            self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> LoraAdapter:
        """Stops serving `name` (KeyError if it is not loaded)."""
        with self._lock:
            return self._adapters.pop(name)

    def get(self, name: str) -> LoraAdapter:
        with self._lock:
            return self._adapters[name]

    def adapters(self) -> list[LoraAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)

    def budget(self) -> AdapterBudget:
        """What one forward may hold: engines fill their batches within it."""
        return AdapterBudget(self.max_loras_per_batch)
