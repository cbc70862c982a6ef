"""services.toml -> deploy/compose/compose.yaml and the Prometheus config it mounts.

Each kvrelay role is a service per instance and per profile: `prefill-0` in profile cpu,
`prefill-0-gpu` in profile gpu. The GPU variant carries the CPU name as a network alias,
so addresses (KVRELAY_PREFILL_ADDRS, KV endpoints, Prometheus targets) are the same in both
profiles. Redis and Prometheus belong to no profile: they run with either.
"""

from __future__ import annotations

from typing import Any

import yaml

from deploy.topology import Param, Role, Topology, expand

HEADER = """\
# Rendered by `python -m deploy.render` from deploy/services.toml: edit that, not this.
# One box, CPU:  docker compose --profile cpu up -d     (from this folder)
# One box, GPU:  docker compose --profile gpu up -d     (a GPU per worker; NVIDIA toolkit)
# Settings: KVRELAY_* variables in the shell or in a .env file here (see deploy/README.md).
"""
PROMETHEUS_HEADER = """\
# Rendered by `python -m deploy.render` from deploy/services.toml: edit that, not this.
"""
PROFILES = ("cpu", "gpu")
BUILD_CONTEXT = "../.."  # the repository root, relative to deploy/compose/
DOCKERFILES = {"cpu": "deploy/docker/Dockerfile.cpu", "gpu": "deploy/docker/Dockerfile.cuda"}
CACHE_VOLUME = "kvrelay-cache"
REQUIRED_MESSAGE = "set it in the shell or in .env, see deploy/README.md"
# Grafana with kvrelay's dashboard (deploy/grafana/), in a profile of its own: add
# `--profile grafana` to run it beside Prometheus (many deployments have a Grafana already).
GRAFANA_IMAGE = "grafana/grafana:11.3.1"
GRAFANA_PORT = 3000
GRAFANA_PROFILE = "grafana"


class ComposeResolver:
    """Service names on the compose network, fixed ports, parameters from the environment."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def port(self, role: Role, instance: str, name: str) -> str:
        return str(role.ports[name])

    def advertise(self, role: Role, instance: str) -> str:
        return instance

    def instance(self, role: Role, instance: str) -> str:
        return instance

    def addrs(self, role: Role) -> str:
        port = role.ports[role.service]
        return ",".join(f"{name}:{port}" for name in role.instances())

    def param(self, param: Param) -> str:
        if param.required:
            # Interpolation fails (compose exits) while the variable is unset or empty.
            return f"${{{param.env}:?{REQUIRED_MESSAGE}}}"
        # Secrets have an empty default: their value only ever comes from the environment.
        return f"${{{param.env}:-{param.default}}}"


def service_name(role: Role, instance: str, profile: str) -> str:
    return instance if not role.is_kvrelay or profile == "cpu" else f"{instance}-gpu"


def _healthcheck(role: Role) -> dict[str, Any]:
    port = str(role.ports[role.health.port])
    return {
        "test": ["CMD", *role.health.command(port)],
        "interval": "10s",
        "timeout": "5s",
        "retries": 3,
        "start_period": f"{role.health.start_period_s}s",
        "start_interval": "2s",
    }


def _service(
    topology: Topology, resolver: ComposeResolver, role: Role, instance: str, profile: str | None
) -> dict[str, Any]:
    def exp(template: str) -> str:
        return expand(template, topology, role, instance, resolver)

    variant = profile or "cpu"
    service: dict[str, Any] = {}
    if profile is not None:
        service["profiles"] = [profile]
    service["image"] = exp(topology.image_of(role, variant))
    if role.is_kvrelay:
        dockerfile = DOCKERFILES["gpu" if role.gpu and variant == "gpu" else "cpu"]
        service["build"] = {"context": BUILD_CONTEXT, "dockerfile": dockerfile}
    service["command"] = [exp(arg) for arg in role.subcommand]
    env = topology.env_of(role, variant)
    if env:
        service["environment"] = {key: exp(value) for key, value in env.items()}
    if role.is_kvrelay:
        models = topology.params["models_dir"]
        service["volumes"] = [
            f"{CACHE_VOLUME}:{exp(topology.kvrelay_volumes['cache'])}",
            f"{resolver.param(models)}:{topology.kvrelay_volumes['models']}:ro",
        ]
    if role.published:
        service["ports"] = [f"{role.ports[p]}:{role.ports[p]}" for p in role.published]
    depends: dict[str, Any] = {}
    for dep_name in role.depends_on:
        dep = topology.role(dep_name)
        for dep_instance in dep.instances():
            depends[service_name(dep, dep_instance, variant)] = {"condition": "service_healthy"}
    if depends:
        service["depends_on"] = depends
    service["healthcheck"] = _healthcheck(role)
    if service_name(role, instance, variant) != instance:
        service["networks"] = {"default": {"aliases": [instance]}}
    resources: dict[str, Any] = {"limits": {"memory": f"{role.resources.memory_mb}M"}}
    if role.gpu and variant == "gpu":
        resources["reservations"] = {
            "devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        }
    service["deploy"] = {"resources": resources}
    service["restart"] = "unless-stopped"
    # The gateway gives requests in flight 5 s, workers drain for 5 s: then SIGKILL.
    service["stop_grace_period"] = "20s"
    return service


def _prometheus_service(topology: Topology) -> dict[str, Any]:
    port = topology.prometheus.port
    return {
        "image": topology.prometheus.image,
        "command": [
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
        ],
        "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
        "ports": [f"{port}:{port}"],
        "healthcheck": {
            "test": ["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{port}/-/ready"],
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
        },
        "restart": "unless-stopped",
    }


def _grafana_service() -> dict[str, Any]:
    return {
        "profiles": [GRAFANA_PROFILE],
        "image": GRAFANA_IMAGE,
        "environment": {
            # Viewers need no account; the admin (admin/admin at first) may edit.
            "GF_AUTH_ANONYMOUS_ENABLED": "true",
            "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/kvrelay.json",
        },
        "volumes": [
            "../grafana/provisioning:/etc/grafana/provisioning:ro",
            "../grafana/dashboards:/var/lib/grafana/dashboards:ro",
        ],
        "ports": [f"{GRAFANA_PORT}:{GRAFANA_PORT}"],
        "depends_on": {"prometheus": {"condition": "service_healthy"}},
        "healthcheck": {
            "test": [
                "CMD",
                "wget",
                "-q",
                "-O",
                "/dev/null",
                f"http://127.0.0.1:{GRAFANA_PORT}/api/health",
            ],
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
        },
        "restart": "unless-stopped",
    }


def compose_document(topology: Topology) -> dict[str, Any]:
    resolver = ComposeResolver(topology)
    services: dict[str, Any] = {}
    for role in topology.roles.values():
        profiles: tuple[str | None, ...] = PROFILES if role.is_kvrelay else (None,)
        for profile in profiles:
            for instance in role.instances():
                name = service_name(role, instance, profile or "cpu")
                services[name] = _service(topology, resolver, role, instance, profile)
    services["prometheus"] = _prometheus_service(topology)
    services["grafana"] = _grafana_service()
    return {"name": "kvrelay", "services": services, "volumes": {CACHE_VOLUME: {}}}


def prometheus_document(topology: Topology) -> dict[str, Any]:
    jobs = []
    for role in topology.roles.values():
        if role.metrics is None:
            continue
        port = role.ports[role.metrics]
        jobs.append(
            {
                "job_name": f"kvrelay-{role.name}",
                "static_configs": [
                    {
                        "targets": [f"{instance}:{port}" for instance in role.instances()],
                        "labels": {"role": role.name},
                    }
                ],
            }
        )
    return {
        "global": {"scrape_interval": topology.prometheus.scrape_interval},
        "scrape_configs": jobs,
    }


class _Dumper(yaml.SafeDumper):
    """Block style, except lists of plain values (commands, tags) on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = all(not isinstance(item, dict | list) for item in data)
    flat = flat and sum(len(str(item)) + 2 for item in data) <= 80
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def to_yaml(document: dict[str, Any], header: str) -> str:
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return header + body


def render(topology: Topology) -> dict[str, str]:
    """File path (relative to deploy/) -> content."""
    required = [p.env for p in topology.params.values() if p.required]
    header = HEADER + (
        f"# Required: {', '.join(required)} (compose stops without).\n" if required else ""
    )
    return {
        "compose/compose.yaml": to_yaml(compose_document(topology), header),
        "compose/prometheus.yml": to_yaml(prometheus_document(topology), PROMETHEUS_HEADER),
    }
