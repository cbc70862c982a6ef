"""Service-level objectives: `--slo ttft_ms=500,tpot_ms=50` and who met them."""

from __future__ import annotations

from loadtest.records import RequestRecord

SLO_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")


def parse_slo(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"bad SLO {part!r}: use {'|'.join(SLO_METRICS)}=MILLISECONDS")
        slo[key] = float(value)
        if slo[key] <= 0:
            raise ValueError(f"SLO {key} must be positive")
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A completed request within every bound; a missing TPOT (one token) is no violation."""
    if not record.ok:
        return False
    for key, bound in slo.items():
        value = getattr(record, key)
        if value is not None and value > bound:
            return False
    return True
