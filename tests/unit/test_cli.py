from __future__ import annotations

import pytest

from services.cli import build_parser
from shared.config import served_model_name


def test_flags_default_to_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_KV_CACHE_MB", "96")
    monkeypatch.setenv("KVRELAY_MODEL_PATH", "/models/x")
    monkeypatch.setenv("KVRELAY_KV_TIMEOUT_S", "2.5")
    args = build_parser().parse_args(["decode"])
    assert (args.kv_cache_mb, args.model_path, args.kv_timeout_s) == (96, "/models/x", 2.5)
    # A flag wins over its variable.
    assert build_parser().parse_args(["decode", "--kv-cache-mb", "8"]).kv_cache_mb == 8


def test_gateway_takes_worker_addresses_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_PREFILL_ADDRS", "p:1,p:2")
    monkeypatch.setenv("KVRELAY_DECODE_ADDRS", "d:1")
    args = build_parser().parse_args(["gateway"])
    assert (args.prefill_addrs, args.decode_addrs, args.port) == ("p:1,p:2", "d:1", 30000)


def test_gateway_without_workers_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVRELAY_PREFILL_ADDRS", raising=False)
    monkeypatch.delenv("KVRELAY_DECODE_ADDRS", raising=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway"])


def test_up_defaults_match_the_design() -> None:
    args = build_parser().parse_args(["up"])
    assert (args.port, args.prefill, args.decode, args.block_size) == (30000, 1, 1, 16)
    assert args.model_path is None


def test_served_model_name() -> None:
    assert served_model_name(None) == "SmolLM2-135M-Instruct"
    assert served_model_name("/m/Qwen2.5-0.5B/") == "Qwen2.5-0.5B"
    assert served_model_name("/m/x.Q4.gguf") == "x.Q4"
    assert served_model_name("/m/x", "mine") == "mine"
