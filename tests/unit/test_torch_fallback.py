"""Without the C++ CPU kernels (no compiler, or KVRELAY_CPU_KERNELS=0) the torch paths, which
the CUDA path shares, give the model the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kernels import cpu_kernels
from tests.tiny_models import build_tiny_llama

# Prefill of two prompts, then a mixed step (one decodes while the other continues), then a
# pure decode step: every path through attention and the fused layer ops.
SCRIPT = """
import json, sys
import torch
from kernels import cpu_kernels
from shared.model.runner import ModelRunner, SeqSlice

runner = ModelRunner(sys.argv[1], kv_cache_mb=1, page_size=8)
a, b = list(range(100, 119)), list(range(300, 330))
pa, pb = runner.pool.allocate(4), runner.pool.allocate(5)
steps = [
    [SeqSlice(a, 0, pa), SeqSlice(b[:20], 0, pb)],
    [SeqSlice([7], len(a), pa), SeqSlice(b[20:], 20, pb)],
    [SeqSlice([8], len(a) + 1, pa), SeqSlice([9], len(b), pb)],
]
logits = [runner.forward(step).tolist() for step in steps]
print(json.dumps({"kernels": cpu_kernels.available(), "logits": logits}))
"""


def _run(model: Path, kernels: bool) -> tuple[bool, torch.Tensor]:
    env = {**os.environ, "KVRELAY_CPU_KERNELS": "1" if kernels else "0"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["kernels"], torch.tensor(out["logits"])


def test_torch_paths_equal_the_kernels(tmp_path: Path) -> None:
    assert cpu_kernels.available()
    model = build_tiny_llama(tmp_path / "tiny", vocab_size=1024, with_tokenizer=False)
    used_kernels, with_kernels = _run(model, kernels=True)
    used_torch, with_torch = _run(model, kernels=False)
    assert used_kernels and not used_torch
    # float32 throughout: the two differ only in summation order.
    torch.testing.assert_close(with_torch, with_kernels, atol=1e-4, rtol=0)
    assert torch.equal(with_torch.argmax(-1), with_kernels.argmax(-1))

