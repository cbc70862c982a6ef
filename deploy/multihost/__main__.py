"""python -m deploy.multihost [--out DIR] [--model-path DIR]: the multi-host run, reported.

Needs root and `ip netns`. Without --model-path a tiny random Llama is built (seconds).
Writes DIR/report.json and DIR/report.png and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deploy.multihost.netns import unavailable_reason
from deploy.multihost.plot import plot_report
from deploy.multihost.scenario import MultiHostScenario, Report, kv_bytes_per_token


def build_tiny_model(out_dir: Path) -> Path:
    """4 layers x 4 KV heads x 32: 4 KiB of float32 KV per token, visible on the links."""
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(out_dir, num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4)


def print_report(console: Console, report: Report) -> None:
    phases = Table(title="requests through the gateway")
    for column in ("phase", "requests", "ok", "failed", "unfinished", "seconds"):
        phases.add_column(column, justify="right" if column != "phase" else "left")
    for name, phase in report.phases.items():
        phases.add_row(name, str(phase.spec.requests), str(phase.ok),
                       str(phase.summary.get("failed", 0)),
                       str(phase.summary.get("unfinished", 0)), f"{phase.seconds:.1f}")
    console.print(phases)
    links = Table(title=f"relay phase: bytes per link (KV at least {report.relay_kv_bytes:,})")
    for column in ("host", "rx bytes", "tx bytes"):
        links.add_column(column, justify="right" if column != "host" else "left")
    for host, traffic in report.relay_traffic.items():
        links.add_row(host, f"{traffic['rx_bytes']:,}", f"{traffic['tx_bytes']:,}")
    console.print(links)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.multihost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("multihost-report"))
    parser.add_argument("--model-path", type=Path, default=None)
    args = parser.parse_args(argv)
    console = Console()
    reason = unavailable_reason()
    if reason is not None:
        console.print(f"[red]cannot run: {reason}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvrelay-multihost-") as tmp:
        model_dir = args.model_path or build_tiny_model(Path(tmp) / "tiny-llama")
        with console.status("multi-host run") as status:
            scenario = MultiHostScenario(
                model_dir, kv_bytes_per_token(model_dir), args.out,
                progress=lambda message: status.update(message),
            )
            try:
                report = scenario.run()
            except Exception:
                console.print(scenario.logs())
                raise
    (args.out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    plot_report(report, args.out / "report.png")
    print_report(console, report)
    console.print(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
