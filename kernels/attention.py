"""Attention seam: one entry point, backends chosen by device.

The model calls `store_kv` and `paged_attention` per layer; everything below this seam may
be swapped for fused kernels without touching model code.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels import cpu_kernels
from kernels.torch_attention import torch_paged_attention

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMetadata", float], torch.Tensor
]


@dataclass
class DecodeSplit:
    """A mixed step's single-token sequences (as a decode step would give them to a kernel)
    and the others."""

    rows: torch.Tensor  # [n] LongTensor: their rows of the flattened new tokens
    page_table: torch.Tensor  # [n, max pages]: their rows of the step's page table
    seq_lens: torch.Tensor  # [n]
    rest: list[int]  # indices of the sequences with more than one new token


@dataclass
class AttentionMetadata:
    """Layout of one forward step over a batch of sequences (flattened, varlen).

    Sequence i contributes new tokens q[cu_new[i]:cu_new[i+1]] at positions
    start_pos[i] .. start_pos[i] + num_new[i] - 1; its K/V live in pages page_ids[i].
    """

    start_pos: list[int]
    num_new: list[int]
    page_ids: list[torch.Tensor]  # per sequence, LongTensor: the pages this step touches
    cu_new: list[int]  # len(num_seqs) + 1 offsets into the flattened new tokens
    page_size: int
    positions: torch.Tensor  # [total_new] LongTensor: absolute position of each new token
    slot_mapping: torch.Tensor  # [total_new] LongTensor: page_id * page_size + offset
    seq_lens: torch.Tensor  # [num_seqs] LongTensor: start_pos + num_new
    page_table: torch.Tensor  # [num_seqs, max pages] page_ids padded with page 0

    @property
    def num_seqs(self) -> int:
        return len(self.num_new)

    @property
    def decode_only(self) -> bool:
        """Every sequence adds exactly one token (a pure decode step)."""
        return self.cu_new[-1] == len(self.num_new)

    @functools.cached_property
    def decode_split(self) -> DecodeSplit:
        """Built once per step, shared by every layer."""
        single = [i for i, n in enumerate(self.num_new) if n == 1]
        device = self.page_table.device
        seqs = torch.tensor(single, dtype=torch.long, device=device)
        return DecodeSplit(
            rows=torch.tensor([self.cu_new[i] for i in single], dtype=torch.long, device=device),
            page_table=self.page_table.index_select(0, seqs),
            seq_lens=self.seq_lens.index_select(0, seqs),
            rest=[i for i, n in enumerate(self.num_new) if n != 1],
        )

    @classmethod
    def build(
        cls,
        start_pos: Sequence[int],
        num_new: Sequence[int],
        page_ids: Sequence[Sequence[int]],
        page_size: int,
        device: str | torch.device = "cpu",
    ) -> AttentionMetadata:
        cu = [0]
        for n in num_new:
            cu.append(cu[-1] + n)
        lens = [s + n for s, n in zip(start_pos, num_new, strict=True)]
        # Only the pages holding tokens up to the end of this step matter.
        pages = [
            torch.tensor(list(p[: -(-length // page_size)]), dtype=torch.long)
            for p, length in zip(page_ids, lens, strict=True)
        ]
        # Positions/slots for all new tokens at once; only the per-sequence pieces loop.
        positions = torch.cat(
            [torch.arange(s, end, dtype=torch.long) for s, end in zip(start_pos, lens, strict=True)]
        )
        seq_pages = torch.cat(
            [
                p.index_select(0, torch.arange(s, end) // page_size)
                for p, s, end in zip(pages, start_pos, lens, strict=True)
            ]
        )
        slots = seq_pages * page_size + positions % page_size
        table = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)
        return cls(
            start_pos=list(start_pos),
            num_new=list(num_new),
            page_ids=[p.to(device) for p in pages],
            cu_new=cu,
            page_size=page_size,
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            seq_lens=torch.tensor(lens, dtype=torch.long, device=device),
            page_table=table.to(device),
        )


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' K/V ([total_new, num_kv_heads, head_dim]) into their page slots."""
    # A [num_pages, page_size, ...] cache viewed flat is indexed by slot directly.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of new tokens over their sequences' paged K/V (new tokens included).

    q: [total_new, num_heads, head_dim]; k_cache/v_cache: one layer's
    [num_pages, page_size, num_kv_heads, head_dim]. Returns [total_new, num_heads, head_dim].
    `window`: sliding-window length (a query sees its last `window` positions), or None.
    """
    if not q.is_cuda and _cpu_kernels_enabled():
        return _cpu_attention(q, k_cache, v_cache, meta, scale, window)
    if window is not None and window < max(
        s + n for s, n in zip(meta.start_pos, meta.num_new, strict=True)
    ):
        # The window changes the result only once a sequence outgrows it; the torch path is
        # the one that masks it (fused backends take it when they come).
        return torch_paged_attention(q, k_cache, v_cache, meta, scale, window)
    return _backend_for(q)(q, k_cache, v_cache, meta, scale)


def _cpu_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Single-token rows through the C++ decode kernel, the rest through torch. A decoding
    sequence thus gets the same numbers whether its step also carries a prefill or not."""
    if meta.decode_only:
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.page_table, meta.seq_lens, scale, window
        )
    split = meta.decode_split
    out = torch.empty_like(q)
    if len(split.rows):
        out[split.rows] = cpu_kernels.paged_decode_attention(
            q.index_select(0, split.rows),
            k_cache,
            v_cache,
            split.page_table,
            split.seq_lens,
            scale,
            window,
        )
    return torch_paged_attention(q, k_cache, v_cache, meta, scale, window, seqs=split.rest, out=out)


def _cpu_kernels_enabled() -> bool:
    return os.environ.get("KVRELAY_ATTENTION_BACKEND") != "torch" and cpu_kernels.available()


def _backend_for(q: torch.Tensor) -> AttentionFn:
    # KVRELAY_ATTENTION_BACKEND=torch forces the reference (e.g. to debug on a GPU).
    if not q.is_cuda or os.environ.get("KVRELAY_ATTENTION_BACKEND") == "torch":
        return torch_paged_attention
    return _cuda_backend()


def _cuda_backend() -> AttentionFn:
    # Imported lazily (it imports flashinfer) so CPU-only installs never need flashinfer.
    try:
        from kernels import flashinfer_attention
    except ImportError as exc:
        raise NotImplementedError(
            "CUDA attention needs flashinfer (pip install 'kvrelay[cuda]'); "
            "set KVRELAY_ATTENTION_BACKEND=torch to use the reference on GPU"
        ) from exc
    fn: AttentionFn = flashinfer_attention.flashinfer_paged_attention
    return fn
