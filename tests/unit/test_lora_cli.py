"""LoRA flags: on the command line, from KVRELAY_* variables, and passed on by `kvrelay up`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import build_parser, lora_paths_arg
from services.launcher import _worker_args


def test_lora_flags_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["decode", "--lora-paths", "a=/x", "b=/y", "--max-loras-per-batch", "4"]
    )
    assert lora_paths_arg(args.lora_paths) == ["a=/x", "b=/y"]
    assert (args.enable_lora, args.max_loras_per_batch, args.max_lora_rank) == (False, 4, 0)
    monkeypatch.setenv("KVRELAY_LORA_PATHS", "a=/x, b=/y")
    monkeypatch.setenv("KVRELAY_ENABLE_LORA", "1")
    args = build_parser().parse_args(["prefill"])
    assert lora_paths_arg(args.lora_paths) == ["a=/x", "b=/y"] and args.enable_lora


def test_up_gives_every_worker_the_adapters_with_absolute_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["up", "--lora-paths", "a=adapters/a", "--max-loras-per-batch", "3"]
    )
    args.served_model_name, args.num_threads = "m", 1
    worker = _worker_args(args, "decode", tmp_path / "model", 1234)
    assert worker[worker.index("--lora-paths") + 1] == f"a={tmp_path / 'adapters' / 'a'}"
    assert worker[worker.index("--max-loras-per-batch") + 1] == "3"
    assert "--enable-lora" in worker
    plain = build_parser().parse_args(["up"])
    plain.served_model_name, plain.num_threads = "m", 1
    assert not any("lora" in a for a in _worker_args(plain, "decode", tmp_path, 1))
