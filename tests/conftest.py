from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.redis_server import RedisServer
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server of the suite's own; tests flush what they use."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
