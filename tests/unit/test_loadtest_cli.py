"""`kvrelay bench` command line: subcommands, sweep lists, A/B configurations."""

from __future__ import annotations

import argparse
import math

import pytest

from loadtest.cli import _concurrencies, _rates, add_run_arguments, options_from_args
from loadtest.scenarios import _model_path, parse_scenario
from services.cli import main as kvrelay_main


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "compare", "--help"],
                                  ["bench", "ab", "--help"]])
def test_kvrelay_bench_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        kvrelay_main(argv)
    assert exit_info.value.code == 0
    assert "usage: kvrelay bench" in capsys.readouterr().out


def test_sweep_lists() -> None:
    assert _rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    assert _concurrencies("1,8,none") == [1, 8, None]
    for bad in ("0", "-1", "nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _rates(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        _concurrencies("0")


def test_options_from_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["--base-url", "http://h:1", "--max-concurrency", "2,4",
                              "--slo", "ttft_ms=300", "--dataset", "multi-turn",
                              "--mt-turns", "3", "--extra-body", '{"top_k": 5}'])
    options = options_from_args(args)
    assert options.sweep == "concurrency"
    assert [p.name for p in options.load_points()] == ["conc=2", "conc=4"]
    assert options.slo == {"ttft_ms": 300.0}
    assert options.dataset.mt_turns == 3
    assert options.endpoint.payload("hi", 4)["top_k"] == 5
    assert options.endpoint.payload("hi", 4)["ignore_eos"] is True
    assert options.dataset.describe()["name"] == "multi-turn"
    assert "gsp_num_groups" not in options.dataset.describe()


def test_ab_configurations() -> None:
    # As argv holds it after the shell: --config pd="--prefill 1 --decode 1".
    scenario = parse_scenario("pd=--prefill 1 --decode 1")
    assert scenario.name == "pd" and scenario.up_args == ("--prefill", "1", "--decode", "1")
    assert parse_scenario("colocated=--colocated").up_args == ("--colocated",)
    quoted = parse_scenario("""t=--chat-template '{{ messages }}'""")
    assert quoted.up_args == ("--chat-template", "{{ messages }}")
    for bad in ("no-equals", "=--colocated", "a/b=--x"):
        with pytest.raises(ValueError):
            parse_scenario(bad)
    assert _model_path(["--prefill", "2", "--model-path", "/m"]) == "/m"
    assert _model_path(["--model-path=/n"]) == "/n"
    assert _model_path(["--decode", "1"]) is None
