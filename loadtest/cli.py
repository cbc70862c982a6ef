"""`kvrelay bench` (also `python -m loadtest`): TTFT/TPOT load tests of any OpenAI server.

    kvrelay bench [run options]              measure one server (a sweep of load points)
    kvrelay bench compare A.json B.json ...  one table, overlaid plots
    kvrelay bench ab --config NAME=FLAGS ... start each `kvrelay up` configuration, measure
                                             it, stop it, compare

Flag names follow vLLM's and SGLang's benchmark tools where they overlap (--base-url,
--model, --num-prompts, --request-rate, --burstiness, --max-concurrency, --random-*).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from datetime import datetime
from pathlib import Path

from loadtest.bench import BenchOptions
from loadtest.client import EndpointConfig
from loadtest.datasets import DATASETS, DatasetOptions
from loadtest.plots import STATS
from loadtest.slo import parse_slo

RUN_EXAMPLE = """examples:
  kvrelay bench --base-url http://127.0.0.1:30000 --num-prompts 200 --request-rate 1,2,4,8
  kvrelay bench --dataset shared-prefix --gsp-num-groups 8 --max-concurrency 1,4,16
  kvrelay bench --dataset sharegpt --dataset-path sharegpt.json --slo ttft_ms=500,tpot_ms=50
  kvrelay bench compare bench-results/a bench-results/b
  kvrelay bench ab --config pd="--prefill 1 --decode 1" --config wide="--decode 2"
"""


def _rates(text: str) -> list[float]:
    rates = [float(v) for v in text.split(",") if v.strip()]
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise argparse.ArgumentTypeError("request rates must be positive (inf: all at once)")
    return rates


def _concurrencies(text: str) -> list[int | None]:
    values: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            values.append(None if part in ("none", "inf") else int(part))
    if not values or any(v is not None and v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrencies must be >= 1")
    return values


def _slo(text: str) -> dict[str, float]:
    try:
        return parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:30000")
    server.add_argument("--model", default=None, help="default: the first of /v1/models")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="Bearer key [env OPENAI_API_KEY]")
    server.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    server.add_argument("--tokenizer", default=None,
                        help="tokenizer dir, GGUF file or cached hub id for exact token counts "
                             "(default: the served model's, when it is on this machine)")
    server.add_argument("--temperature", type=float, default=0.0)
    server.add_argument("--no-ignore-eos", action="store_true",
                        help="let the model stop early (default: ask for every token)")
    server.add_argument("--extra-body", type=json.loads, default={},
                        help="JSON merged into every request body")
    server.add_argument("--request-timeout-s", type=float, default=600.0)

    data = parser.add_argument_group("dataset (built before the clock starts)")
    data.add_argument("--dataset", choices=sorted(DATASETS), default="random")
    data.add_argument("--num-prompts", type=int, default=None,
                      help="requests per load point (default: the dataset's own size)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--random-input-len", type=int, default=256)
    data.add_argument("--random-output-len", type=int, default=64)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [len*(1-r), len*(1+r)]")
    data.add_argument("--gsp-num-groups", type=int, default=4)
    data.add_argument("--gsp-prompts-per-group", type=int, default=8)
    data.add_argument("--gsp-system-prompt-len", type=int, default=512)
    data.add_argument("--gsp-question-len", type=int, default=64)
    data.add_argument("--gsp-output-len", type=int, default=64)
    data.add_argument("--mt-turns", type=int, default=4, help="turns per conversation")
    data.add_argument("--mt-turn-len", type=int, default=64, help="tokens of each user turn")
    data.add_argument("--dataset-path", type=Path, default=None, help="ShareGPT JSON file")
    data.add_argument("--sharegpt-output-len", type=int, default=None)
    data.add_argument("--sharegpt-max-len", type=int, default=2048)
    data.add_argument("--sharegpt-multi-turn", action="store_true")

    load = parser.add_argument_group("load (each combination is one load point)")
    load.add_argument("--request-rate", type=_rates, default=[math.inf],
                      help="requests (sessions) per second, comma list to sweep; inf: all "
                           "at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of arrival gaps: 1 Poisson, <1 burstier")
    load.add_argument("--max-concurrency", type=_concurrencies, default=[None],
                      help="requests in flight at most, comma list to sweep")
    load.add_argument("--warmup-requests", type=int, default=1,
                      help="sent at once before measuring (they also open that many "
                           "connections)")
    load.add_argument("--duration-s", type=float, default=None,
                      help="per load point: stop sending after this long")
    load.add_argument("--drain-timeout-s", type=float, default=60.0,
                      help="after --duration-s, how long running requests may finish")

    out = parser.add_argument_group("results")
    out.add_argument("--slo", type=_slo, default={},
                     help="ttft_ms=...,tpot_ms=...,e2e_ms=...: goodput and SLO attainment")
    out.add_argument("--output-dir", type=Path, default=None,
                     help="default: bench-results/LABEL-TIMESTAMP")
    out.add_argument("--label", default=None, help="name of this configuration in plots")
    out.add_argument("--no-server-metrics", action="store_true", help="do not scrape /metrics")
    out.add_argument("--metrics-interval-s", type=float, default=1.0)
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--plot-stat", choices=STATS, default="p50",
                     help="statistic of the TTFT-vs-TPOT plot")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--log-level", default="warning",
                     choices=["debug", "info", "warning", "error"])


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    label = args.label or (args.model or "run").rsplit("/", 1)[-1]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dataset = DatasetOptions(
        name=args.dataset, num_prompts=args.num_prompts, seed=args.seed,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, gsp_num_groups=args.gsp_num_groups,
        gsp_prompts_per_group=args.gsp_prompts_per_group,
        gsp_system_prompt_len=args.gsp_system_prompt_len,
        gsp_question_len=args.gsp_question_len, gsp_output_len=args.gsp_output_len,
        mt_turns=args.mt_turns, mt_turn_len=args.mt_turn_len, dataset_path=args.dataset_path,
        sharegpt_output_len=args.sharegpt_output_len, sharegpt_max_len=args.sharegpt_max_len,
        sharegpt_multi_turn=args.sharegpt_multi_turn,
    )
    endpoint = EndpointConfig(
        base_url=args.base_url, model=args.model or "", endpoint=args.endpoint,
        api_key=args.api_key, temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos, extra_body=args.extra_body,
        request_timeout_s=args.request_timeout_s,
    )
    return BenchOptions(
        endpoint=endpoint, dataset=dataset,
        output_dir=args.output_dir or Path("bench-results") / f"{label}-{stamp}",
        label=label, tokenizer=args.tokenizer, request_rates=args.request_rate,
        max_concurrencies=args.max_concurrency, burstiness=args.burstiness,
        warmup_requests=args.warmup_requests, duration_s=args.duration_s,
        drain_timeout_s=args.drain_timeout_s, slo=args.slo,
        server_metrics=not args.no_server_metrics, metrics_interval_s=args.metrics_interval_s,
        plots=not args.no_plots, plot_stat=args.plot_stat, progress=not args.no_progress,
    )


def _parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=RUN_EXAMPLE,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run_main(argv: list[str]) -> int:
    parser = _parser("kvrelay bench", __doc__)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    from loadtest.bench import run_benchmark

    run_benchmark(options_from_args(args))
    return 0


def ab_main(argv: list[str]) -> int:
    from loadtest.scenarios import parse_scenario, run_scenarios

    parser = _parser("kvrelay bench ab", "Start each configuration with `kvrelay up`, "
                     "measure it, stop it, and compare them.")
    parser.add_argument("--config", action="append", required=True, metavar="NAME=FLAGS",
                        help='a configuration: NAME="kvrelay up flags" (repeat)')
    parser.add_argument("--up-args", default="",
                        help='flags for every configuration, e.g. --up-args="--model-path M"')
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        scenarios = [parse_scenario(text) for text in args.config]
    except ValueError as exc:
        parser.error(str(exc))
    if args.output_dir is None:
        args.output_dir = Path("bench-results") / f"ab-{datetime.now():%Y%m%d-%H%M%S}"
    import shlex

    run_scenarios(scenarios, shlex.split(args.up_args), options_from_args(args),
                  args.ready_timeout_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from loadtest.compare import main as compare_main

        return compare_main(argv[1:])
    if argv[:1] == ["ab"]:
        return ab_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    return run_main(argv)
