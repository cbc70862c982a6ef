"""deploy/nomad: HashiCorp's HCL parser reads the jobs, and each role gets what it needs.

There is no `nomad` binary here, so Nomad's own rules for what this job uses are checked
over the parsed tree (pygohcl is HCL's Go parser). pygohcl writes an interpolation such as
"${NOMAD_PORT_grpc}" or "${var.image}" as the name it refers to: NOMAD_PORT_grpc, var.image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pygohcl
import pytest

from deploy.render_nomad import JOB, SECRETS_PATH, needs_template, service_name
from deploy.topology import Role, Topology, load, placeholders

NOMAD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nomad"
PROFILES = ("cpu", "gpu")


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load()


def parse(profile: str) -> dict[str, Any]:
    document: dict[str, Any] = pygohcl.loads(
        (NOMAD_DIR / f"kvrelay-{profile}.nomad.hcl").read_text()
    )
    return document


def as_list(node: Any) -> list[dict[str, Any]]:
    """A repeated unlabeled block is a list, a single one a dict."""
    if node is None:
        return []
    return node if isinstance(node, list) else [node]


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def test_every_nomad_file_parses() -> None:
    files = sorted(NOMAD_DIR.glob("*.nomad.hcl"))
    assert [f.name for f in files] == ["kvrelay-cpu.nomad.hcl", "kvrelay-gpu.nomad.hcl"]
    for file in files:
        assert JOB in pygohcl.loads(file.read_text())["job"]


@pytest.mark.parametrize("profile", PROFILES)
def test_job_rolls_out_one_at_a_time_and_reverts_on_failure(
    profile: str, topology: Topology
) -> None:
    job = parse(profile)["job"][JOB]
    assert job["type"] == "service"
    update = job["update"]
    assert update["max_parallel"] == 1 and update["auto_revert"] is True
    assert update["health_check"] == "checks"
    slowest = max(role.health.start_period_s for role in topology.roles.values())
    assert int(update["healthy_deadline"].removesuffix("s")) > slowest
    assert set(job["group"]) == set(topology.roles)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_variable_used_is_declared_and_none_holds_a_secret(
    profile: str, topology: Topology
) -> None:
    document = parse(profile)
    declared = set(document["variable"])
    used = {m for s in strings(document["job"]) for m in re.findall(r"var\.([a-z_]+)", s)}
    assert used <= declared, used - declared
    secrets = {name for name, p in topology.params.items() if p.secret}
    assert not secrets & declared, "secrets come from Nomad Variables, not job variables"
    for role in topology.roles.values():
        if role.scalable:
            assert document["variable"][f"{role.name}_count"]["default"] == role.count


def _check_group(profile: str, topology: Topology, role: Role, group: dict[str, Any]) -> None:
    where = f"{profile}/{role.name}"
    expected_count = f"var.{role.name}_count" if role.scalable else role.count
    assert group["count"] == expected_count, where
    ports = group["network"]["port"]
    assert set(ports) == set(role.ports), where
    for name in role.published:
        assert ports[name] == {"static": role.ports[name]}, where
    if role.published:
        assert group["constraint"]["operator"] == "distinct_hosts", where
    assert group["restart"]["attempts"] > 0 and group["restart"]["mode"] == "delay", where
    assert group["reschedule"]["unlimited"] is True, where

    services = {s["name"]: s for s in as_list(group["service"])}
    main = services[service_name(role)]
    assert main["provider"] == "nomad" and main["port"] == role.service, where
    check = main["check"]
    assert check["port"] == role.health.port, where
    if role.health.kind == "http":
        assert check["type"] == "http" and check["path"] == role.health.path, where
    else:
        assert check["type"] == "tcp", where
    assert check["check_restart"]["grace"] == f"{role.health.start_period_s}s", where
    if role.metrics is not None:
        scraped = [s for s in services.values() if "prometheus" in s["tags"]]
        assert [s["port"] for s in scraped] == [role.metrics], where

    task = group["task"][role.name]
    assert task["driver"] == "docker", where
    config = task["config"]
    assert config["network_mode"] == "host", where
    if role.is_kvrelay:
        image = "var.cuda_image" if role.gpu and profile == "gpu" else "var.image"
        assert config["image"] == image, where
        assert config["args"] == role.subcommand, where
        assert group["volume"]["cache"]["type"] == "host", where
        assert group["volume"]["models"]["read_only"] is True, where
        mounts = {m["volume"]: m for m in as_list(task["volume_mount"])}
        assert mounts["cache"]["destination"] == "var.cache_dir", where
        assert mounts["models"] == {
            "volume": "models",
            "destination": "/models",
            "read_only": True,
        }, where
    else:
        assert config["image"] == role.image, where
        assert [config["command"], *config["args"]][0] == role.command[0], where

    env = task.get("env", {})
    template = task.get("template", {})
    data = template.get("data", "")
    for name, value in topology.env_of(role, profile).items():
        if needs_template(topology, value):
            assert f"\n{name}=" in f"\n{data}", f"{where}: {name} missing from the template"
            assert name not in env, where
            for kind, arg in placeholders(value):
                if kind in ("addrs", "addr"):
                    other = topology.role(arg)
                    assert f'nomadService "{service_name(other)}"' in data, where
                if kind == "param":
                    assert f'nomadVar "{SECRETS_PATH}"' in data, where
        else:
            assert name in env, f"{where}: {name} missing from env"
            for kind, arg in placeholders(value):
                if kind == "port":
                    assert f"NOMAD_PORT_{arg}" in env[name], where
                elif kind == "advertise":
                    assert env[name] == f"NOMAD_IP_{role.service}", where
                elif kind == "param":
                    assert f"var.{arg}" in env[name], where
    if data:
        assert template["env"] is True and template["change_mode"] == "restart", where
    if f'nomadVar "{SECRETS_PATH}"' in data:
        # A missing key (the internal token) fails the task rather than starting it without.
        assert template["error_on_missing_key"] is True, where
    for param in topology.params.values():
        if param.secret:
            assert param.env not in env, f"{where}: {param.env} in plain env"

    resources = task["resources"]
    assert resources["cpu"] == role.resources.cpu_mhz, where
    assert resources["memory"] == role.resources.memory_mb, where
    devices = resources.get("device", {})
    if role.gpu and profile == "gpu":
        assert devices == {"nvidia/gpu": {"count": 1}}, where
    else:
        assert devices == {}, where


@pytest.mark.parametrize("profile", PROFILES)
def test_each_role_group_has_what_it_needs(profile: str, topology: Topology) -> None:
    groups = parse(profile)["job"][JOB]["group"]
    for role in topology.roles.values():
        _check_group(profile, topology, role, groups[role.name])


def test_gateway_finds_workers_through_the_service_registry() -> None:
    task = parse("cpu")["job"][JOB]["group"]["gateway"]["task"]["gateway"]
    data = task["template"]["data"]
    assert 'KVRELAY_PREFILL_ADDRS={{ range $i, $s := nomadService "kvrelay-prefill" }}' in data
    assert 'KVRELAY_DECODE_ADDRS={{ range $i, $s := nomadService "kvrelay-decode" }}' in data


@pytest.mark.parametrize("profile", PROFILES)
def test_every_kvrelay_task_reads_the_internal_token_from_nomad_variables(
    profile: str, topology: Topology
) -> None:
    groups = parse(profile)["job"][JOB]["group"]
    line = (
        f'KVRELAY_INTERNAL_TOKEN={{{{ with nomadVar "{SECRETS_PATH}" }}}}{{{{ .internal_token }}}}'
    )
    for role in topology.roles.values():
        data = groups[role.name]["task"][role.name].get("template", {}).get("data", "")
        assert (line in data) == role.is_kvrelay, role.name


@pytest.mark.parametrize("profile", PROFILES)
def test_header_says_which_secrets_to_put(profile: str, topology: Topology) -> None:
    text = (NOMAD_DIR / f"kvrelay-{profile}.nomad.hcl").read_text()
    put = next(line for line in text.splitlines() if "nomad var put" in line)
    path, *items = put.split("nomad var put", 1)[1].split()
    assert path == SECRETS_PATH, put
    assert {item.split("=")[0] for item in items} == {
        name for name, p in topology.params.items() if p.secret
    }, put
