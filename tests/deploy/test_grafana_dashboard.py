"""deploy/grafana: the dashboard is valid Grafana JSON, and every query names a real metric.

The metric names come from the services' own metric classes (gateway and worker), listed
from their registries the way Prometheus would scrape them; labels in selectors must be
labels those metrics have (or the ones Prometheus adds: job, instance).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from services.gateway.worker_clients import WorkerPool
from shared.kv_pool import KVPool
from shared.observability.request_metrics import RequestObservation
from shared.observability.worker_metrics import WorkerMetrics, WorkerProbe

GRAFANA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "compose.yaml"
SCRAPE_LABELS = {"job", "instance", "role"}  # added by Prometheus (role: our scrape config)

GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string"}},
}
TARGET = {
    "type": "object",
    "required": ["refId", "expr"],
    "properties": {
        "refId": {"type": "string", "minLength": 1},
        "expr": {"type": "string", "minLength": 1},
        "legendFormat": {"type": "string"},
        "datasource": DATASOURCE,
    },
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {
            "enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text"]
        },
        "title": {"type": "string", "minLength": 1},
        "gridPos": GRID,
        "datasource": DATASOURCE,
        "targets": {"type": "array", "items": TARGET},
        "fieldConfig": {"type": "object", "required": ["defaults", "overrides"]},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"required": ["collapsed", "panels"]},
    "else": {
        "required": ["datasource", "targets", "fieldConfig"],
        "properties": {"targets": {"minItems": 1}},
    },
}
# What Grafana needs to import a dashboard (schemaVersion 39: Grafana 10.x and 11.x).
DASHBOARD = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating", "version"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "refresh": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "type"]},
                }
            },
        },
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> its label names, for every metric gateway and workers export."""
    gateway = GatewayMetrics()
    gateway.watch_pool(WorkerPool(["127.0.0.1:1"], ["127.0.0.1:2"]))
    worker = WorkerMetrics()
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=4)
    worker.bind(
        WorkerProbe(
            "prefill",
            "p0",
            "m",
            "127.0.0.1:1",
            pool,
            running=lambda: 0,
            queued=lambda: 0,
            hit_rate=lambda: 0.0,
        )
    )
    # A labelled metric shows its labels once it has a series: give each one.
    gateway.show_policy("prefix")
    gateway.routed_requests.labels(policy="prefix").inc()
    gateway.requests.record(RequestObservation("/v1/completions", generation=True), 200)
    worker.transfer.sent(1, 1, 0.1)
    worker.transfer.received(1, 1, 0.1)
    worker.transfer.failed("send", "unreachable")
    names: dict[str, set[str]] = {}
    for registry in (gateway.registry, worker.registry):
        text = generate_latest(registry).decode()
        for family in text_string_to_metric_families(text):
            assert family.samples, f"{family.name} has no series"
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


@pytest.fixture(scope="module")
def metrics() -> dict[str, set[str]]:
    return exported_metrics()


def test_there_is_a_dashboard() -> None:
    assert [d.name for d in DASHBOARDS] == ["kvrelay.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_grafana_json(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    jsonschema.validate(dashboard, DASHBOARD)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        ref_ids = [t["refId"] for t in panel.get("targets", ())]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    # Every panel's data source is the dashboard's variable, which defaults to the
    # provisioned Prometheus.
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    provisioned = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert variable["current"]["value"] == provisioned["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${" + variable["name"] + "}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_metrics_the_services_export(
    path: Path, metrics: dict[str, set[str]]
) -> None:
    dashboard = json.loads(path.read_text())
    missing = []
    for title, expr in queries(dashboard):
        used = re.findall(r"\b((?:kvrelay|process)_[a-z0-9_]+)", expr)
        assert used, f"{title}: {expr} names no metric"
        for name in used:
            if name not in metrics:
                missing.append(f"{title}: {name}")
        for name, selector in re.findall(r"\b(kvrelay_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in metrics.get(name, set()) | SCRAPE_LABELS, f"{title}: {label}"
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in grouping.split(",")} - {"le"} - SCRAPE_LABELS
            named = [n for n in used if n in metrics]
            assert all(labels <= metrics.get(n, set()) for n in named), f"{title}: by {labels}"
    assert not missing, missing


def test_the_headline_figures_are_on_the_dashboard() -> None:
    exprs = " ".join(
        expr for path in DASHBOARDS for _, expr in queries(json.loads(path.read_text()))
    )
    for needed in (
        "kvrelay_time_to_first_token_seconds_bucket",
        "kvrelay_time_per_output_token_seconds_bucket",
        "kvrelay_gateway_generation_tokens_total",
        "kvrelay_prefix_cache_hit_tokens_total",
        "kvrelay_kv_cache_usage_ratio",
        "kvrelay_kv_transfer_bytes_total",
    ):
        assert needed in exprs, needed


def test_compose_provisions_the_dashboard() -> None:
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "kvrelay.yml").read_text()
    )["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == "../grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "../grafana/provisioning"
