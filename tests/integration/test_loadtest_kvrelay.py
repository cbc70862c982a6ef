"""`kvrelay bench` against a real kvrelay cluster (tiny model): files, numbers, plots."""

from __future__ import annotations

import itertools
import os
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from transformers import AutoTokenizer

from loadtest.cli import main as bench_main
from loadtest.records import Distribution, RequestRecord, RunSummary
from loadtest.results import load_run
from services.processes import ChildProcess, http_healthy
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("bench-tiny"))


@pytest.fixture(scope="module")
def tiny_cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(tiny_model, tmp_path_factory.mktemp("bench-cluster"),
                            model_name="tiny-bench", worker_args=["--num-threads", "1"])
    try:
        yield cluster
    finally:
        cluster.stop()


def _bench(cluster: Cluster, tokenizer: Path, out: Path, *extra: str) -> tuple[
        RunSummary, list[RequestRecord]]:
    assert bench_main(["--base-url", cluster.base_url, "--tokenizer", str(tokenizer),
                       "--output-dir", str(out), "--no-progress", *extra]) == 0
    return load_run(out)


def _assert_distribution(dist: Distribution, values: list[float]) -> None:
    assert dist.count == len(values)
    expected = np.percentile(values, [50, 90, 95, 99])
    for got, want in zip((dist.p50, dist.p90, dist.p95, dist.p99), expected, strict=True):
        assert got == pytest.approx(want)
    assert dist.mean == pytest.approx(np.mean(values))
    assert dist.max == pytest.approx(max(values))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 200 and height > 200 and len(data) > 5000, path


def test_bench_summary_agrees_with_its_request_records(
    tiny_cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary, records = _bench(
        tiny_cluster, tiny_model, out, "--endpoint", "completions", "--num-prompts", "8",
        "--random-input-len", "40", "--random-output-len", "6", "--request-rate", "16,inf",
        "--slo", "ttft_ms=2000,tpot_ms=500", "--label", "tiny",
    )
    assert summary.model == "tiny-bench"  # found through /v1/models
    assert summary.token_counts_exact and summary.sweep == "request_rate"
    assert [p.load.request_rate for p in summary.points] == [16.0, float("inf")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for point in summary.points:
        mine = [r for r in records if r.point == point.point]
        assert len(mine) == point.num_requests == point.completed == 8
        assert point.host_load_avg is not None and point.host_load_avg >= 0
        assert all(r.ok for r in mine) and point.errors == {}
        # ignore_eos: every answer as long as asked; the server's counts come back in usage.
        assert all(r.output_tokens == r.requested_output_tokens == 6 for r in mine)
        assert all(r.prompt_tokens_source == "usage" for r in mine)
        # The prompt really had the asked-for length in the server's tokenizer (plus BOS,
        # when the tokenizer adds one).
        specials = len(tokenizer("", add_special_tokens=True)["input_ids"])
        assert all(r.prompt_tokens == 40 + specials for r in mine)
        _assert_distribution(point.ttft_ms, [r.ttft_ms for r in mine if r.ttft_ms is not None])
        _assert_distribution(point.tpot_ms, [r.tpot_ms for r in mine if r.tpot_ms is not None])
        _assert_distribution(point.e2e_ms, [r.e2e_ms for r in mine if r.e2e_ms is not None])
        _assert_distribution(point.itl_ms, [gap for r in mine for gap in r.itl_ms])
        for r in mine:
            assert r.ttft_ms is not None and r.e2e_ms is not None and r.tpot_ms is not None
            assert r.tpot_ms == pytest.approx((r.e2e_ms - r.ttft_ms) / (r.output_tokens - 1))
        start = min(r.start_ms for r in mine)
        end = max(r.start_ms + (r.e2e_ms or 0) for r in mine)
        assert point.duration_s == pytest.approx((end - start) / 1e3)
        assert point.output_throughput == pytest.approx(48 / point.duration_s)
        assert point.input_throughput == pytest.approx(
            sum(r.prompt_tokens for r in mine) / point.duration_s)
        met = sum(1 for r in mine if (r.ttft_ms or 0) <= 2000 and (r.tpot_ms or 0) <= 500)
        assert point.slo_attainment == pytest.approx(met / 8)
        assert point.goodput == pytest.approx(met / point.duration_s)
    for name in ("ttft_vs_tpot", "ttft_cdf", "tpot_cdf", "throughput_vs_load", "slo_attainment"):
        _assert_png(out / f"{name}.png")
    # What the gateway's /metrics says, when it serves one.
    exported = httpx.get(f"{tiny_cluster.base_url}/metrics")
    for point in summary.points:
        assert point.server.available == (exported.status_code == 200)
        if "kvrelay_prefix_cache_query_tokens_total" in exported.text:
            assert point.server.prefix_hit_rate is not None
            assert 0 <= point.server.prefix_hit_rate <= 1
            # Only this point's prompts: 8 prompts of 40 tokens (+ BOS) were looked up.
            looked_up = point.server.counters["kvrelay_prefix_cache_query_tokens_total"]
            assert looked_up == 8 * (40 + specials)


def test_multi_turn_and_shared_prefix_reach_the_server_as_designed(
    tiny_cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    _, records = _bench(tiny_cluster, tiny_model, tmp_path / "mt", "--dataset", "multi-turn",
                        "--num-prompts", "6", "--mt-turns", "3", "--mt-turn-len", "12",
                        "--random-output-len", "4", "--max-concurrency", "2", "--no-plots")
    by_session: dict[int, list[RequestRecord]] = {}
    for record in records:
        by_session.setdefault(record.session_id, []).append(record)
    assert sorted(len(turns) for turns in by_session.values()) == [3, 3]
    for turns in by_session.values():
        lengths = [r.prompt_tokens for r in sorted(turns, key=lambda r: r.turn)]
        # Each turn carries the earlier turns and their answers: at least 12 + 4 more.
        assert all(b >= a + 16 for a, b in itertools.pairwise(lengths)), lengths
    summary, records = _bench(tiny_cluster, tiny_model, tmp_path / "gsp", "--dataset",
                              "shared-prefix", "--gsp-num-groups", "2",
                              "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "48",
                              "--gsp-question-len", "8", "--gsp-output-len", "3", "--no-plots")
    assert summary.points[0].completed == 6
    assert sorted(r.group for r in records if r.group is not None) == [0, 0, 0, 1, 1, 1]


def test_compare_overlays_runs(tiny_cluster: Cluster, tiny_model: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    for name, endpoint in (("chat", "chat"), ("text", "completions")):
        _bench(tiny_cluster, tiny_model, tmp_path / name, "--endpoint", endpoint,
               "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "4",
               "--max-concurrency", "1,2", "--label", name, "--no-plots")
    capsys.readouterr()
    assert bench_main(["compare", str(tmp_path / "chat" / "summary.json"),
                       str(tmp_path / "text"), "--output-dir", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "chat conc=1" in table and "text conc=2" in table
    for name in ("ttft_vs_tpot", "ttft_cdf", "tpot_cdf", "throughput_vs_load"):
        _assert_png(tmp_path / "cmp" / f"{name}.png")


def test_ab_starts_measures_and_stops_each_configuration(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    from services.cli import main as kvrelay_main

    out = tmp_path / "ab"
    code = kvrelay_main([
        "bench", "ab", "--config", "one-decode=--decode 1", "--config", "two-decode=--decode 2",
        f"--up-args=--model-path {tiny_model} --no-redis --kv-cache-mb 32 --num-threads 1",
        "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "4",
        "--request-rate", "8,inf", "--output-dir", str(out), "--no-progress",
    ])
    assert code == 0
    for name in ("one-decode", "two-decode"):
        summary, records = load_run(out / name)
        assert summary.label == name and summary.token_counts_exact
        assert len(records) == 8 and all(r.ok for r in records)
        # The cluster is gone once measured: its gateway no longer answers.
        assert not http_healthy(f"{summary.base_url}/health", timeout_s=1)
        assert "kvrelay is up" in (out / name / "kvrelay-up.log").read_text()
    for plot in ("ttft_vs_tpot", "throughput_vs_load"):
        _assert_png(out / "compare" / f"{plot}.png")


def test_sigterm_to_bench_ab_stops_the_cluster_it_started(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "ab"
    bench = ChildProcess("bench ab", [
        sys.executable, "-m", "loadtest", "ab", "--config", "only=--decode 1",
        f"--up-args=--model-path {tiny_model} --no-redis --kv-cache-mb 32 --num-threads 1",
        "--num-prompts", "50", "--request-rate", "2", "--random-input-len", "16",
        "--output-dir", str(out), "--no-progress",
    ], log_path=tmp_path / "bench.log").start()
    try:
        up_log = out / "only" / "kvrelay-up.log"
        bench.wait_ready(lambda: up_log.is_file() and "kvrelay is up" in up_log.read_text(),
                         timeout_s=120)
        cluster = psutil.Process(bench.pid).children(recursive=True)
        assert len(cluster) >= 4  # kvrelay up, its gateway, prefill and decode workers
        time.sleep(1.0)  # measuring now
        os.kill(bench.pid, signal.SIGTERM)
        assert bench.process is not None
        assert bench.process.wait(timeout=60) != 0
        _, alive = psutil.wait_procs(cluster, timeout=30)
        assert alive == [], f"left running: {[p.pid for p in alive]}"
    finally:
        bench.stop()
