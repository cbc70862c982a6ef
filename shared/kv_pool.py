"""Paged KV cache: one preallocated tensor, fixed-size pages, ref-counted page ownership."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

import torch

from shared.model.config import ModelConfig


class KVPoolExhausted(Exception):
    """Not enough free pages; nothing was allocated."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"KV pool exhausted: requested {requested} pages, {free} free")
        self.requested = requested
        self.free = free


class KVPool:
    """Fixed pool of KV pages shared by all sequences of one model.

    `kv[l, 0]` / `kv[l, 1]` are layer l's K / V caches, each
    [num_pages, page_size, num_kv_heads, head_dim]; a token at position p of a sequence
    lives in page `page_ids[p // page_size]` at offset `p % page_size`.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.kv = torch.zeros(
            (num_layers, 2, num_pages, page_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )
        self._lock = threading.Lock()
        self._refs = [0] * num_pages
        # A stack; reversed so that a fresh pool hands out pages 0, 1, 2, ...
        self._free = list(range(num_pages - 1, -1, -1))

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        kv_cache_mb: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVPool:
        """As many pages as fit in `kv_cache_mb` MiB."""
        page_bytes = cfg.kv_bytes_per_token(dtype) * page_size
        num_pages = int(kv_cache_mb) * 2**20 // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"kv_cache_mb={kv_cache_mb} is smaller than one KV page ({page_bytes} bytes)"
            )
        return cls(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_pages, page_size, dtype, device
        )

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages (ref count 1 each); all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        with self._lock:
            if n > len(self._free):
                raise KVPoolExhausted(n, len(self._free))
            if n == 0:
                return []
            pages = self._free[-n:]
            del self._free[-n:]
            pages.reverse()
            for p in pages:
                self._refs[p] = 1
            return pages

    def incref(self, pages: Sequence[int]) -> None:
        """Add an owner to pages already in use (prefix sharing, parallel sampling)."""
        with self._lock:
            for p in pages:
                self._check_range(p)
                if self._refs[p] == 0:
                    raise ValueError(f"incref of free page {p}")
            for p in pages:
                self._refs[p] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Drop one owner per listed page; a page rejoins the free list at ref count 0."""
        with self._lock:
            # Validate first so a bad call changes nothing.
            for p, times in Counter(pages).items():
                self._check_range(p)
                if self._refs[p] < times:
                    raise ValueError(f"free of page {p} that is not in use (double free?)")
            for p in pages:
                self._refs[p] -= 1
                if self._refs[p] == 0:
                    self._free.append(p)

    def refcount(self, page: int) -> int:
        self._check_range(page)
        return self._refs[page]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def _check_range(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page id {page} out of range [0, {self.num_pages})")
