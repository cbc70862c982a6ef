from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.model.loader import resolve_model_dir
from tests.cluster import Cluster, start_cluster


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct, converted from its GGUF once and cached."""
    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def default_cluster(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Gateway, one prefill and one decode worker on the default model, separate processes."""
    cluster = start_cluster(
        default_model_dir,
        tmp_path_factory.mktemp("default-cluster"),
        model_name="SmolLM2-135M-Instruct",
        # One torch thread per worker: two workers share this machine's two cores.
        worker_args=["--num-threads", "1"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()
