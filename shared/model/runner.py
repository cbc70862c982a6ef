"""ModelRunner: the model plus its KV pool, driven by per-sequence slices of new tokens."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.attention import AttentionMetadata
from shared.kv_pool import KVPool
from shared.model.config import ModelConfig
from shared.model.decoder import DecoderModel
from shared.model.linear import QUANTIZED_MAX_ROWS
from shared.model.lora import LoraAdapter
from shared.model.lora_registry import LoraRegistry
from shared.model.registry import load_model

log = logging.getLogger(__name__)


@dataclass
class SeqSlice:
    token_ids: list[int]  # new tokens to compute this step
    start_pos: int  # tokens of this sequence already in its KV pages
    page_ids: list[int]  # pages of this sequence, covering at least start_pos + len(token_ids)
    lora: LoraAdapter | None = None  # the adapter its tokens go through, if any
    record_routing: bool = False  # keep its tokens' routed experts (runner.routed_experts)


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype = torch.float32,
        kv_cache_mb: int = 512,
        page_size: int = 16,
        num_threads: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        t0 = time.monotonic()
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_dir = Path(model_dir)  # its tokenizer, for grammars (shared/grammar.py)
        self.config: ModelConfig = ModelConfig.from_dir(model_dir)
        self.model = load_model(model_dir, dtype, self.device)
        self.pool = KVPool.for_model(self.config, kv_cache_mb, page_size, dtype, self.device)
        self.lora: LoraRegistry | None = None  # set by enable_lora
        self.routing_enabled = False  # set by enable_routed_experts
        # After each forward: per slice, its tokens' experts [tokens, layers, top_k] int32
        # on the CPU when it set record_routing, else None.
        self.routed_experts: list[torch.Tensor | None] = []
        log.info(
            "loaded %s (%s, %s) in %.1fs; KV pool %d pages x %d tokens (%.0f MiB)",
            model_dir,
            self.config.architecture,
            dtype,
            time.monotonic() - t0,
            self.pool.num_pages,
            page_size,
            self.pool.num_pages * self.pool.page_bytes() / 2**20,
        )
        model = self.model
        if isinstance(model, DecoderModel):
            reading = model.linears_reading_blocks()
            if reading:
                log.info(
                    "%d matmuls read GGUF blocks at batches up to %d rows",
                    reading,
                    QUANTIZED_MAX_ROWS,
                )

    def enable_lora(self, max_loras_per_batch: int = 8, max_rank: int = 0) -> LoraRegistry:
        """Serve LoRA adapters: at most `max_loras_per_batch` distinct ones in a forward."""
        self.lora = LoraRegistry(
            self.config, self.dtype, self.device, max_loras_per_batch, max_rank
        )
        return self.lora

    def enable_routed_experts(self) -> bool:
        """Lets requests ask for their routed experts (--enable-return-routed-experts).
        False, and nothing enabled, for a model without routed experts."""
        model = self.model
        self.routing_enabled = (
            isinstance(model, DecoderModel) and model.spec.moe and self.config.moe is not None
        )
        return self.routing_enabled

    def routed_experts_refusal(self) -> str | None:
        """Why a request may not ask for its routed experts here (None: it may)."""
        if self.routing_enabled:
            return None
        model = self.model
        if not (isinstance(model, DecoderModel) and model.spec.moe and self.config.moe):
            return f"return_routed_experts: {self.config.architecture} has no routed experts"
        return "return_routed_experts needs workers started with --enable-return-routed-experts"

    @torch.inference_mode()
    def forward(self, seqs: list[SeqSlice]) -> torch.Tensor:
        """Compute all new tokens; return float32 logits [len(seqs), vocab] of each last one."""
        if not seqs:
            raise ValueError("forward needs at least one sequence")
        self._validate(seqs)
        ids = [t for s in seqs for t in s.token_ids]
        meta = AttentionMetadata.build(
            [s.start_pos for s in seqs],
            [len(s.token_ids) for s in seqs],
            [s.page_ids for s in seqs],
            self.pool.page_size,
            self.device,
        )
        last_idx = torch.tensor(meta.cu_new[1:], dtype=torch.long, device=self.device) - 1
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        lora = None
        if self.lora is not None:
            lora = self.lora.slots.batch([s.lora for s in seqs], [len(s.token_ids) for s in seqs])
        model = self.model
        # Only when a slice asks: recording runs every token through the last layer's MLP.
        record = self.routing_enabled and any(s.record_routing for s in seqs)
        if record and isinstance(model, DecoderModel):
            model.record_routing, model.routed_experts = True, None
        logits = model.forward(input_ids, meta, self.pool.kv, last_idx, lora=lora)
        self.routed_experts = []
        if record and isinstance(model, DecoderModel):
            model.record_routing = False
            if model.routed_experts is not None:
                rows = model.routed_experts.cpu()
                self.routed_experts = [
                    rows[a:b] if s.record_routing else None
                    for s, a, b in zip(seqs, meta.cu_new[:-1], meta.cu_new[1:], strict=True)
                ]
        return logits

    @torch.inference_mode()
    def hidden_states(self, seqs: list[SeqSlice]) -> torch.Tensor:
        """Compute all new tokens like `forward`; return the last layer's hidden states
        (after the final norm) of every new token: float32 [total new tokens, hidden]."""
        if not seqs:
            raise ValueError("hidden_states needs at least one sequence")
        model = self.model
        if not isinstance(model, DecoderModel):
            raise NotImplementedError(f"{type(model).__name__} gives no hidden states")
        self._validate(seqs)
        meta = AttentionMetadata.build(
            [s.start_pos for s in seqs],
            [len(s.token_ids) for s in seqs],
            [s.page_ids for s in seqs],
            self.pool.page_size,
            self.device,
        )
        ids = [t for s in seqs for t in s.token_ids]
        every = torch.arange(len(ids), dtype=torch.long, device=self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        lora = None
        if self.lora is not None:
            lora = self.lora.slots.batch([s.lora for s in seqs], [len(s.token_ids) for s in seqs])
        return model.forward(input_ids, meta, self.pool.kv, every, lora=lora, hidden=True)

    def _validate(self, seqs: list[SeqSlice]) -> None:
        ps, num_pages = self.pool.page_size, self.pool.num_pages
        vocab, max_ctx = self.config.vocab_size, self.config.max_context
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            end = s.start_pos + n
            if n == 0 or s.start_pos < 0:
                raise ValueError(f"seq {i}: need >= 1 new token and start_pos >= 0")
            if end > max_ctx:
                raise ValueError(f"seq {i}: length {end} exceeds max context {max_ctx}")
            if len(s.page_ids) * ps < end:
                raise ValueError(
                    f"seq {i}: {len(s.page_ids)} pages of {ps} cannot hold {end} tokens"
                )
            used = s.page_ids[: -(-end // ps)]  # min/max run in C: cheap for long sequences
            if min(used) < 0 or max(used) >= num_pages:
                raise ValueError(f"seq {i}: page id out of range [0, {num_pages})")
            if min(s.token_ids) < 0 or max(s.token_ids) >= vocab:
                raise ValueError(f"seq {i}: token id out of range [0, {vocab})")
            if s.lora is not None and self.lora is None:
                raise ValueError(f"seq {i}: LoRA adapter {s.lora.name!r} but LoRA is not enabled")
