"""A short soak (loadtest/soak.py): 300 requests with random faults injected (clients
dropping streams, workers hung and resumed, workers killed and restarted). Nothing fails
but what a fault explains, no page stays held, no process's memory keeps growing.

Real processes, tiny model. `python -m loadtest.soak` runs the long version.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtest.soak import SoakSettings, run_soak
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

RSS_GROWTH = 64 << 20  # bytes a process may grow by over the soak (allocator warm-up)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("soak")
    cluster = start_cluster(
        build_tiny_llama(tmp_path / "tiny"),
        tmp_path / "logs",
        num_prefill=2,
        num_decode=2,
        kv_cache_mb=32,
        metrics=True,
        worker_args=["--num-threads", "1"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def test_soak_with_random_faults_keeps_accounting_flat(cluster: Cluster) -> None:
    settings = SoakSettings(
        requests=300, concurrency=4, max_tokens=16, fault_gap_s=(0.5, 1.5), kill_share=0.4, seed=7
    )
    report = run_soak(cluster, settings)
    print("\n" + report.text())
    assert report.failures == [], report.failures
    assert sum(report.outcomes.values()) == settings.requests
    assert report.outcomes.get("ok", 0) > settings.requests // 2, report.outcomes
    assert report.outcomes.get("dropped_by_client", 0) > 0
    assert report.faults.get("hang", 0) and report.faults.get("kill", 0), report.faults
    assert report.pages_leaked == 0, report.pages_end
    for name in report.rss_end:
        assert report.rss_growth(name) < RSS_GROWTH, (name, report.rss_start, report.rss_end)
