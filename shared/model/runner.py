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
from shared.model.registry import load_model

log = logging.getLogger(__name__)


@dataclass
class SeqSlice:
    token_ids: list[int]  # new tokens to compute this step
    start_pos: int  # tokens of this sequence already in its KV pages
    page_ids: list[int]  # pages of this sequence, covering at least start_pos + len(token_ids)


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
        self.config: ModelConfig = ModelConfig.from_dir(model_dir)
        self.model = load_model(model_dir, dtype, self.device)
        self.pool = KVPool.for_model(self.config, kv_cache_mb, page_size, dtype, self.device)
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
        return self.model.forward(input_ids, meta, self.pool.kv, last_idx)

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
