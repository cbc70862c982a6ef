"""The model runner, timing each forward pass for the worker's metrics."""

from __future__ import annotations

import time
from typing import Any

import torch

from shared.model.runner import ModelRunner, SeqSlice
from shared.observability.worker_metrics import worker_metrics


class MeteredRunner(ModelRunner):
    """A ModelRunner whose forward passes count as the `role` engine's steps.

    On CUDA a forward only queues kernels: its time here is launch time unless something
    waits for the logits first (the sampler does, right after).
    """

    def __init__(self, *args: Any, role: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_metrics = worker_metrics().steps[role]

    def forward(self, seqs: list[SeqSlice]) -> torch.Tensor:
        started = time.perf_counter()
        logits = super().forward(seqs)
        self.step_metrics.observe(
            len(seqs), sum(len(s.token_ids) for s in seqs), time.perf_counter() - started
        )
        return logits
