"""The fault table: what a client saw for each injected fault, how long recovery took, and
how many KV pages stayed behind.

The fault tests (tests/faults/) append one JSON line per fault to a records file; this
script prints them as a Markdown table:

    python -m loadtest.fault_table [RECORDS]   (default: $KVRELAY_FAULT_RECORDS or
                                                <tmp>/kvrelay-fault-records.jsonl)

The last record of each fault wins, so a rerun of one test replaces its row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


def default_records_path() -> Path:
    explicit = os.environ.get("KVRELAY_FAULT_RECORDS")
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / "kvrelay-fault-records.jsonl"


@dataclass(frozen=True)
class FaultRecord:
    fault: str  # what was done, e.g. "prefill SIGKILL during the KV transfer"
    client_saw: str  # e.g. "200 (retried on another pair)", "SSE error event then [DONE]"
    recover_s: float  # fault injected -> the next new request succeeded
    pages_leaked: int  # KV pages still held on surviving workers once idle (must be 0)
    detail: str = ""


def append_record(record: FaultRecord, path: Path | None = None) -> None:
    path = path or default_records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(asdict(record)) + "\n")


def read_records(path: Path | None = None) -> list[FaultRecord]:
    path = path or default_records_path()
    if not path.exists():
        return []
    latest: dict[str, FaultRecord] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = FaultRecord(**json.loads(line))
            latest.pop(record.fault, None)  # keep the order of the latest runs
            latest[record.fault] = record
    return list(latest.values())


def render_table(records: Sequence[FaultRecord]) -> str:
    lines = [
        "| fault | what the client saw | time to recover | pages leaked |",
        "|---|---|---|---|",
    ]
    for r in records:
        saw = r.client_saw + (f" ({r.detail})" if r.detail else "")
        lines.append(f"| {r.fault} | {saw} | {r.recover_s:.2f} s | {r.pages_leaked} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("records", nargs="?", type=Path, default=None)
    args = parser.parse_args(argv)
    records = read_records(args.records)
    if not records:
        print(f"no fault records in {args.records or default_records_path()}", file=sys.stderr)
        return 1
    print(render_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
