"""Result files: summary.json (aggregates) and requests.jsonl (one record per request)."""

from __future__ import annotations

from pathlib import Path

from loadtest.records import RequestRecord, RunSummary

SUMMARY_FILE = "summary.json"


def append_records(path: Path, records: list[RequestRecord]) -> None:
    with path.open("a") as out:
        for record in records:
            out.write(record.model_dump_json() + "\n")


def read_records(path: Path) -> list[RequestRecord]:
    with path.open() as lines:
        return [RequestRecord.model_validate_json(line) for line in lines if line.strip()]


def write_summary(out_dir: Path, summary: RunSummary) -> Path:
    path = out_dir / SUMMARY_FILE
    path.write_text(summary.model_dump_json(indent=2) + "\n")
    return path


def load_run(path: Path) -> tuple[RunSummary, list[RequestRecord]]:
    """A summary (the file, or the folder holding summary.json) and its request records."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    summary = RunSummary.model_validate_json(path.read_text())
    requests = path.parent / summary.requests_file
    return summary, read_records(requests) if requests.is_file() else []
