"""services.toml -> deploy/nomad/kvrelay-{cpu,gpu}.nomad.hcl and deploy/nomad/prometheus.yml.

One job, a group per role. Services register in Nomad's own registry (provider "nomad");
whoever needs another role's address (the gateway its workers, everyone Redis) reads it
from the registry through a `template` block, which restarts the task when it changes.
Tasks use the host's network so that the ports a worker advertises (its KV endpoint) are
the ones peers reach, with no NAT on the KV path.
"""

from __future__ import annotations

from typing import Any

from deploy.hcl_writer import Block, Expr, Heredoc, write
from deploy.render_compose import to_yaml
from deploy.topology import Param, Role, Topology, expand, placeholders

JOB = "kvrelay"
SECRETS_PATH = f"nomad/jobs/{JOB}"  # Nomad Variables readable by this job's tasks
HEADER = """\
# Rendered by `python -m deploy.render` from deploy/services.toml: edit that, not this.
# Needs: Nomad >= 1.5 with the docker driver, host volumes "kvrelay-cache" and
# "kvrelay-models" on every client{gpu_note}, and the secrets variable with every key
# ({optional}: may be empty; a task fails to start while a key is missing):
#   nomad var put {secrets_path} {secrets}
# Run:   nomad job run -var image=REGISTRY/kvrelay:cpu{gpu_var} {file}
"""
PROMETHEUS_HEADER = """\
# Rendered by `python -m deploy.render` from deploy/services.toml: edit that, not this.
# Prometheus finds kvrelay's services (tag "prometheus") in Nomad's registry.
"""


def service_name(role: Role) -> str:
    return f"{JOB}-{role.name}"


def _registry_addrs(role: Role) -> str:
    # Go template (consul-template) over Nomad's registry: "host:port,host:port".
    return (
        f'{{{{ range $i, $s := nomadService "{service_name(role)}" }}}}'
        "{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}"
    )


class NomadEnvResolver:
    """Values of the `env` block: Nomad's runtime variables and job variables."""

    def port(self, role: Role, instance: str, name: str) -> str:
        return f"${{NOMAD_PORT_{name}}}"

    def advertise(self, role: Role, instance: str) -> str:
        return f"${{NOMAD_IP_{role.service}}}"

    def instance(self, role: Role, instance: str) -> str:
        return "${NOMAD_GROUP_NAME}-${NOMAD_ALLOC_INDEX}"

    def addrs(self, role: Role) -> str:
        raise ValueError("addresses of other roles come from the registry, in a template")

    def param(self, param: Param) -> str:
        if param.secret:
            raise ValueError("secrets come from Nomad Variables, in a template")
        return f"${{var.{param.name}}}"


class NomadTemplateResolver(NomadEnvResolver):
    """Values of the `template` block: the registry, Nomad Variables, the task's env."""

    def port(self, role: Role, instance: str, name: str) -> str:
        return f'{{{{ env "NOMAD_PORT_{name}" }}}}'

    def advertise(self, role: Role, instance: str) -> str:
        return f'{{{{ env "NOMAD_IP_{role.service}" }}}}'

    def instance(self, role: Role, instance: str) -> str:
        return '{{ env "NOMAD_GROUP_NAME" }}-{{ env "NOMAD_ALLOC_INDEX" }}'

    def addrs(self, role: Role) -> str:
        return _registry_addrs(role)

    def param(self, param: Param) -> str:
        if param.secret:
            return f'{{{{ with nomadVar "{SECRETS_PATH}" }}}}{{{{ .{param.name} }}}}{{{{ end }}}}'
        return f"${{var.{param.name}}}"


def _hcl(topology: Topology, role: Role, template: str) -> str | Expr:
    """An `env`-side value; a bare job variable is written as the expression `var.NAME`."""
    found = list(placeholders(template))
    if len(found) == 1 and found[0][0] == "param" and template == f"{{param:{found[0][1]}}}":
        return Expr(f"var.{found[0][1]}")
    return expand(template, topology, role, role.name, NomadEnvResolver())


def needs_template(topology: Topology, template: str) -> bool:
    """Whether a value must be rendered by Nomad's template engine (registry or secret)."""
    for kind, arg in placeholders(template):
        if kind in ("addrs", "addr"):
            return True
        if kind == "param" and topology.params[arg].secret:
            return True
    return False


def _reads_secrets(topology: Topology, template: str) -> bool:
    return any(
        kind == "param" and topology.params[arg].secret for kind, arg in placeholders(template)
    )


def _secrets_command(topology: Topology) -> tuple[str, str]:
    """(the keys of `nomad var put`, the keys that may be empty)."""
    secrets = [p for p in topology.params.values() if p.secret]
    keys = " ".join(f"{p.name}=..." for p in secrets)
    optional = ", ".join(p.name for p in secrets if not p.required) or "none"
    return keys, optional


def _variables(topology: Topology, profile: str) -> list[Block]:
    blocks: list[Block] = []
    for param in topology.params.values():
        if param.secret or param.name == "models_dir":
            continue  # secrets: Nomad Variables; models: a host volume
        if param.name == "cuda_image" and profile != "gpu":
            continue
        var = Block("variable", (param.name,))
        var.attr("type", Expr("string")).attr("default", param.default)
        var.attr("description", param.help)
        blocks.append(var)
    for role in topology.roles.values():
        if not role.scalable:
            continue
        var = Block("variable", (f"{role.name}_count",))
        var.attr("type", Expr("number")).attr("default", role.count)
        var.attr("description", f"number of {role.name} instances")
        blocks.append(var)
    dcs = Block("variable", ("datacenters",))
    dcs.attr("type", Expr("list(string)")).attr("default", ["*"])
    blocks.append(dcs)
    return blocks


def _check(role: Role) -> Block:
    check = Block("check")
    health = role.health
    if health.kind == "http":
        check.attr("type", "http").attr("path", health.path)
    else:
        # Nomad's own registry checks http and tcp only. A worker binds its gRPC port once
        # the model is loaded; the image's HEALTHCHECK runs the full gRPC health check.
        check.attr("type", "tcp")
    check.attr("port", health.port).attr("interval", "10s").attr("timeout", "3s")
    restart = check.block("check_restart")
    restart.attr("limit", 3).attr("grace", f"{health.start_period_s}s")
    restart.attr("ignore_warnings", False)
    return check


def _task(topology: Topology, role: Role, profile: str) -> Block:
    task = Block("task", (role.name,))
    task.attr("driver", "docker")
    task.attr("kill_timeout", "20s")
    env_resolver, template_resolver = NomadEnvResolver(), NomadTemplateResolver()
    config = task.block("config")
    config.attr("image", _hcl(topology, role, topology.image_of(role, profile)))
    config.attr("network_mode", "host")
    args = [expand(a, topology, role, role.name, env_resolver) for a in role.subcommand]
    if role.is_kvrelay:
        config.attr("args", args)
    else:
        config.attr("command", args[0]).attr("args", args[1:])
    env = topology.env_of(role, profile)
    plain = {k: v for k, v in env.items() if not needs_template(topology, v)}
    templated = {k: v for k, v in env.items() if needs_template(topology, v)}
    if plain:
        task.block("env").items.extend((k, _hcl(topology, role, v)) for k, v in plain.items())
    if templated:
        lines = [
            f"{k}={expand(v, topology, role, role.name, template_resolver)}"
            for k, v in templated.items()
        ]
        template = task.block("template")
        template.comment("Addresses from Nomad's registry and secrets: a change restarts the task.")
        template.attr("data", Heredoc("\n".join(lines)))
        template.attr("destination", "secrets/discovered.env")
        template.attr("env", True)
        template.attr("change_mode", "restart")
        if any(_reads_secrets(topology, v) for v in templated.values()):
            # A key missing from the Nomad Variables fails the task instead of starting it
            # without, say, the internal token.
            template.attr("error_on_missing_key", True)
    if role.is_kvrelay:
        cache = _hcl(topology, role, topology.kvrelay_volumes["cache"])
        task.block("volume_mount").attr("volume", "cache").attr("destination", cache)
        mount = task.block("volume_mount")
        mount.attr("volume", "models").attr("destination", topology.kvrelay_volumes["models"])
        mount.attr("read_only", True)
    resources = task.block("resources")
    resources.attr("cpu", role.resources.cpu_mhz).attr("memory", role.resources.memory_mb)
    if role.gpu and profile == "gpu":
        resources.block("device", "nvidia/gpu").attr("count", 1)
    return task


def _group(topology: Topology, role: Role, profile: str) -> Block:
    group = Block("group", (role.name,))
    group.attr("count", Expr(f"var.{role.name}_count") if role.scalable else role.count)
    if role.published:
        group.comment("Published ports are static: one instance per client.")
        constraint = group.block("constraint")
        constraint.attr("operator", "distinct_hosts").attr("value", "true")
    network = group.block("network")
    for name, number in role.ports.items():
        port = network.block("port", name)
        if name in role.published:
            port.attr("static", number)
    restart = group.block("restart")
    restart.attr("attempts", 3).attr("interval", "10m").attr("delay", "15s")
    restart.attr("mode", "delay")
    reschedule = group.block("reschedule")
    reschedule.attr("delay", "30s").attr("delay_function", "exponential")
    reschedule.attr("max_delay", "10m").attr("unlimited", True)
    if role.is_kvrelay:
        for volume, source, read_only in (
            ("cache", "kvrelay-cache", False),
            ("models", "kvrelay-models", True),
        ):
            block = group.block("volume", volume)
            block.attr("type", "host").attr("source", source).attr("read_only", read_only)
    service = group.block("service")
    tags = [role.name]
    if role.metrics == role.service:
        tags.append("prometheus")
    service.attr("name", service_name(role)).attr("provider", "nomad")
    service.attr("port", role.service).attr("tags", tags)
    service.items.append(_check(role))
    if role.metrics is not None and role.metrics != role.service:
        metrics = group.block("service")
        metrics.attr("name", f"{service_name(role)}-metrics").attr("provider", "nomad")
        metrics.attr("port", role.metrics).attr("tags", [role.name, "prometheus"])
    group.items.append(_task(topology, role, profile))
    return group


def _job(topology: Topology, profile: str) -> Block:
    job = Block("job", (JOB,))
    job.attr("datacenters", Expr("var.datacenters")).attr("type", "service")
    update = job.block("update")
    update.comment("One instance at a time; a new version must pass its checks or it is undone.")
    update.attr("max_parallel", 1).attr("health_check", "checks")
    update.attr("min_healthy_time", "30s")
    start = max(role.health.start_period_s for role in topology.roles.values())
    update.attr("healthy_deadline", f"{start + 300}s")
    update.attr("progress_deadline", f"{start + 600}s")
    update.attr("auto_revert", True)
    for role in topology.roles.values():
        job.items.append(_group(topology, role, profile))
    return job


def nomad_job(topology: Topology, profile: str) -> str:
    file = f"kvrelay-{profile}.nomad.hcl"
    secrets, optional = _secrets_command(topology)
    header = HEADER.format(
        gpu_note=", the NVIDIA device plugin" if profile == "gpu" else "",
        secrets_path=SECRETS_PATH,
        secrets=secrets,
        optional=optional,
        gpu_var=" -var cuda_image=REGISTRY/kvrelay:cuda" if profile == "gpu" else "",
        file=file,
    )
    return write([*_variables(topology, profile), _job(topology, profile)], header)


def prometheus_document(topology: Topology) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": topology.prometheus.scrape_interval},
        "scrape_configs": [
            {
                "job_name": JOB,
                "nomad_sd_configs": [{"server": "http://127.0.0.1:4646"}],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_nomad_tags"],
                        "regex": ".*,prometheus,.*",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_nomad_service"], "target_label": "service"},
                ],
            }
        ],
    }


def render(topology: Topology) -> dict[str, str]:
    """File path (relative to deploy/) -> content."""
    files = {f"nomad/kvrelay-{p}.nomad.hcl": nomad_job(topology, p) for p in ("cpu", "gpu")}
    files["nomad/prometheus.yml"] = to_yaml(prometheus_document(topology), PROMETHEUS_HEADER)
    return files
