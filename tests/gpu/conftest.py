"""Tests of the CUDA path: each is skipped, with the reason said, where CUDA is absent."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def needs_cuda() -> None:
    # Session scope: set up before any other fixture, so none builds anything in vain.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
