"""loadtest.bench_engine runs end to end (on a tiny model) and writes its table as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import bench_engine
from tests.tiny_models import build_tiny_llama


def test_bench_engine_measures_both_engines(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "tiny", with_tokenizer=False)
    out = tmp_path / "bench.json"
    args = ["--model-path", str(model), "--batches", "1,3", "--contexts", "9,20"]
    args += ["--prefill-lengths", "17", "--steps", "2", "--out", str(out)]
    assert bench_engine.main(args) == 0
    summary = json.loads(out.read_text())
    assert [row["what"] for row in summary["rows"]] == [
        "decode tok/s, batch 1, context 9",
        "decode tok/s, batch 3, context 9",
        "decode tok/s, batch 1, context 20",
        "decode tok/s, batch 3, context 20",
        "prefill tok/s, 17 tokens",
    ]
    for row in summary["rows"]:
        assert row["kvrelay"] > 0 and row["hf"] > 0
        assert row["ratio"] == row["kvrelay"] / row["hf"]
