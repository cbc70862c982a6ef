"""A/B in one command: start each configuration with `kvrelay up`, measure it, stop it, compare.

    kvrelay bench ab --config prefix="--router-policy prefix" \
                     --config rr="--router-policy round_robin" \
                     --up-args="--model-path M --prefill 2 --decode 1" [run options]

Every configuration gets the same prompts (same seeds), a fresh cluster on a free port,
and its own folder under --output-dir; the comparison lands in --output-dir/compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench import BenchOptions, run_benchmark
from loadtest.compare import compare
from loadtest.records import RunSummary
from loadtest.results import SUMMARY_FILE
from services.processes import ChildProcess, free_port, http_healthy

log = logging.getLogger("kvrelay.bench")


@dataclass(frozen=True)
class Scenario:
    name: str
    up_args: tuple[str, ...]


def parse_scenario(text: str) -> Scenario:
    """NAME=FLAGS, e.g. `colocated=--colocated` or `pd="--prefill 1 --decode 1"`."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name or "/" in name:
        raise ValueError(f"bad --config {text!r}: expected NAME=\"kvrelay up flags\"")
    return Scenario(name, tuple(shlex.split(flags)))


def _model_path(args: list[str]) -> str | None:
    for index, arg in enumerate(args):
        if arg == "--model-path" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--model-path="):
            return arg.split("=", 1)[1]
    return None


def run_scenario(scenario: Scenario, common_up_args: list[str], options: BenchOptions,
                 ready_timeout_s: float) -> RunSummary:
    out_dir = options.output_dir / scenario.name
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    up_args = [*common_up_args, *scenario.up_args]
    cluster = ChildProcess.kvrelay(
        f"kvrelay up [{scenario.name}]",
        ["up", "--host", "127.0.0.1", "--port", str(port), *up_args],
        log_path=out_dir / "kvrelay-up.log",
    )
    print(f"[{scenario.name}] kvrelay up {shlex.join(up_args)} (log {cluster.log_path})")
    cluster.start()
    try:
        cluster.wait_ready(lambda: http_healthy(f"{base_url}/health"), ready_timeout_s)
        tokenizer = options.tokenizer
        model_path = _model_path(up_args)
        if tokenizer is None and model_path is not None:
            from shared.model.loader import resolve_model_dir

            tokenizer = str(resolve_model_dir(model_path))
        run_options = dataclasses.replace(
            options,
            endpoint=dataclasses.replace(options.endpoint, base_url=base_url),
            output_dir=out_dir, label=scenario.name, tokenizer=tokenizer,
        )
        return run_benchmark(run_options)
    finally:
        cluster.stop()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the cluster being measured is stopped too
    (Python's default would exit at once and leave `kvrelay up` running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_scenarios(scenarios: list[Scenario], common_up_args: list[str], options: BenchOptions,
                  ready_timeout_s: float = 300.0) -> list[RunSummary]:
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must differ: {names}")
    with _sigterm_unwinds():
        summaries = [run_scenario(s, common_up_args, options, ready_timeout_s)
                     for s in scenarios]
    paths = scenario_paths(options.output_dir, scenarios)
    compare(paths, options.output_dir / "compare", options.plot_stat, plots=options.plots)
    return summaries


def scenario_paths(out_dir: Path, scenarios: list[Scenario]) -> list[Path]:
    return [out_dir / s.name / SUMMARY_FILE for s in scenarios]
