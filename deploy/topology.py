"""deploy/services.toml as typed data, checked, with its placeholders resolved per platform.

Every deployment of kvrelay (docker compose, Nomad, the multi-host test) reads the same
file through `load()`; a platform only says how it names hosts, ports and parameters (a
`Resolver`), and `expand()` does the rest.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

SOURCE = Path(__file__).with_name("services.toml")

# The project's own image; its entrypoint is the `kvrelay` command.
KVRELAY_IMAGE = "kvrelay"
ENTRYPOINT = "kvrelay"

PlaceholderKind = Literal["port", "advertise", "instance", "addrs", "addr", "param"]
_PLACEHOLDER = re.compile(r"\{(port|advertise|instance|addrs|addr|param)(?::([A-Za-z0-9_-]+))?\}")
_NEEDS_ARG = {"port", "addrs", "addr", "param"}


class TopologyError(ValueError):
    """services.toml says something inconsistent (a missing port, role or parameter)."""


@dataclass(frozen=True)
class Param:
    name: str
    env: str  # compose reads the value from this variable
    default: str
    help: str = ""
    secret: bool = False
    required: bool = False  # no default: the deployment refuses to run without a value


HEALTHCHECK_PROGRAM = "kvrelay-healthcheck"  # deploy/healthcheck.py, installed in the image


@dataclass(frozen=True)
class Health:
    kind: Literal["grpc", "http", "redis"]
    port: str
    path: str = "/"
    start_period_s: int = 60  # how long a starting service may fail its check (model loading)

    def command(self, port: str) -> list[str]:
        """The probe, run next to the service (inside its container or namespace)."""
        if self.kind == "grpc":
            return [HEALTHCHECK_PROGRAM, "grpc", f"127.0.0.1:{port}"]
        if self.kind == "http":
            return [HEALTHCHECK_PROGRAM, "http", f"http://127.0.0.1:{port}{self.path}"]
        return ["redis-cli", "-p", port, "ping"]


@dataclass(frozen=True)
class Resources:
    cpu_mhz: int
    memory_mb: int


@dataclass(frozen=True)
class Profile:
    name: str
    image: str  # template: the image of roles with gpu = true
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Role:
    name: str
    image: str  # KVRELAY_IMAGE or an outside image
    command: tuple[str, ...]
    count: int
    ports: dict[str, int]
    service: str  # the port registered for discovery and listed by {addrs:ROLE}
    health: Health
    resources: Resources
    env: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    published: tuple[str, ...] = ()  # ports reachable from outside the deployment
    metrics: str | None = None  # port serving /metrics
    gpu: bool = False  # gets a GPU (and the profile's image) in the GPU profile
    scalable: bool = True  # its count may change (redis: no, everyone reaches the one)

    @property
    def is_kvrelay(self) -> bool:
        return self.image == KVRELAY_IMAGE

    @property
    def singleton(self) -> bool:
        """One instance by design (redis, gateway): named after the role, without an index."""
        return self.count == 1

    def instances(self, count: int | None = None) -> list[str]:
        n = self.count if count is None else count
        if self.singleton:
            if n != 1:
                raise TopologyError(f"{self.name} has a single instance, not {n}")
            return [self.name]
        return [f"{self.name}-{i}" for i in range(n)]

    @property
    def subcommand(self) -> list[str]:
        """The command without the image's entrypoint (what compose and Nomad pass as args)."""
        if self.is_kvrelay:
            return list(self.command[1:])
        return list(self.command)


@dataclass(frozen=True)
class Prometheus:
    image: str
    port: int
    scrape_interval: str


@dataclass(frozen=True)
class Topology:
    params: dict[str, Param]
    profiles: dict[str, Profile]
    kvrelay_env: dict[str, str]
    kvrelay_volumes: dict[str, str]  # volume name -> mount point (template)
    roles: dict[str, Role]  # in start order
    prometheus: Prometheus

    def role(self, name: str) -> Role:
        try:
            return self.roles[name]
        except KeyError:
            raise TopologyError(f"no role {name!r} in {sorted(self.roles)}") from None

    def env_of(self, role: Role, profile: str = "cpu") -> dict[str, str]:
        """The role's environment, as templates: kvrelay's common env, the role's, the profile's."""
        env: dict[str, str] = {}
        if role.is_kvrelay:
            env.update(self.kvrelay_env)
        env.update(role.env)
        if role.gpu:
            env.update(self.profiles[profile].env)
        return env

    def image_of(self, role: Role, profile: str = "cpu") -> str:
        """Template of the role's image: an outside image, or the profile's kvrelay image."""
        if not role.is_kvrelay:
            return role.image
        return self.profiles[profile if role.gpu else "cpu"].image


class Resolver(Protocol):
    """How one platform names what placeholders refer to."""

    def port(self, role: Role, instance: str, name: str) -> str: ...
    def advertise(self, role: Role, instance: str) -> str: ...
    def instance(self, role: Role, instance: str) -> str: ...
    def addrs(self, role: Role) -> str: ...
    def param(self, param: Param) -> str: ...


def placeholders(template: str) -> Iterator[tuple[PlaceholderKind, str]]:
    for match in _PLACEHOLDER.finditer(template):
        kind: Any = match.group(1)
        yield kind, match.group(2) or ""


def expand(template: str, topology: Topology, role: Role, instance: str, resolver: Resolver) -> str:
    """`template` with every placeholder replaced as `resolver` says."""

    def replace(match: re.Match[str]) -> str:
        kind, arg = match.group(1), match.group(2) or ""
        if kind == "port":
            return resolver.port(role, instance, arg)
        if kind == "advertise":
            return resolver.advertise(role, instance)
        if kind == "instance":
            return resolver.instance(role, instance)
        if kind in ("addrs", "addr"):
            return resolver.addrs(topology.role(arg))
        return resolver.param(topology.params[arg])

    return _PLACEHOLDER.sub(replace, template)


def load(path: Path = SOURCE) -> Topology:
    with path.open("rb") as f:
        raw = tomllib.load(f)
    topology = _parse(raw)
    _check(topology)
    return topology


def _parse(raw: Mapping[str, Any]) -> Topology:
    params = {
        name: Param(
            name=name,
            env=p["env"],
            default=str(p["default"]),
            help=p.get("help", ""),
            secret=bool(p.get("secret", False)),
            required=bool(p.get("required", False)),
        )
        for name, p in raw.get("params", {}).items()
    }
    profiles = {
        name: Profile(name=name, image=p["image"], env=dict(p.get("env", {})))
        for name, p in raw.get("profiles", {}).items()
    }
    kvrelay = raw.get("kvrelay", {})
    roles: dict[str, Role] = {}
    for name, r in raw.get("roles", {}).items():
        try:
            roles[name] = Role(
                name=name,
                image=r["image"],
                command=tuple(r["command"]),
                count=int(r["count"]),
                ports={k: int(v) for k, v in r["ports"].items()},
                service=r["service"],
                health=Health(**r["health"]),
                resources=Resources(**r["resources"]),
                env=dict(r.get("env", {})),
                depends_on=tuple(r.get("depends_on", ())),
                published=tuple(r.get("published", ())),
                metrics=r.get("metrics"),
                gpu=bool(r.get("gpu", False)),
                scalable=bool(r.get("scalable", True)),
            )
        except (KeyError, TypeError) as exc:
            raise TopologyError(f"role {name!r}: {exc!r}") from exc
    return Topology(
        params=params,
        profiles=profiles,
        kvrelay_env=dict(kvrelay.get("env", {})),
        kvrelay_volumes=dict(kvrelay.get("volumes", {})),
        roles=roles,
        prometheus=Prometheus(**raw["prometheus"]),
    )


def _check(topology: Topology) -> None:
    if set(topology.profiles) != {"cpu", "gpu"}:
        raise TopologyError(f"profiles must be cpu and gpu, not {sorted(topology.profiles)}")
    for param in topology.params.values():
        if param.required and param.default:
            raise TopologyError(f"parameter {param.name!r} is required: it has no default")
    seen: list[str] = []
    for role in topology.roles.values():
        where = f"role {role.name!r}"
        for port in (role.service, role.health.port, *role.published, role.metrics):
            if port is not None and port not in role.ports:
                raise TopologyError(f"{where}: no port {port!r} in {sorted(role.ports)}")
        for dep in role.depends_on:
            if dep not in seen:
                raise TopologyError(f"{where} depends on {dep!r}, which is not an earlier role")
        if role.is_kvrelay and role.command[:1] != (ENTRYPOINT,):
            raise TopologyError(f"{where}: a kvrelay role's command starts with {ENTRYPOINT!r}")
        texts = [
            *role.command,
            *topology.env_of(role, "cpu").values(),
            *topology.env_of(role, "gpu").values(),
            topology.image_of(role, "gpu"),
        ]
        if role.is_kvrelay:
            texts += list(topology.kvrelay_volumes.values())
        for text in texts:
            _check_placeholders(topology, role, text, where)
        seen.append(role.name)


def _check_placeholders(topology: Topology, role: Role, text: str, where: str) -> None:
    for kind, arg in placeholders(text):
        if kind in _NEEDS_ARG and not arg:
            raise TopologyError(f"{where}: {{{kind}}} needs an argument in {text!r}")
        if kind == "port" and arg not in role.ports:
            raise TopologyError(f"{where}: no port {arg!r} for {text!r}")
        if kind in ("addrs", "addr"):
            other = topology.role(arg)
            if kind == "addr" and (not other.singleton or other.scalable):
                raise TopologyError(
                    f"{where}: {{addr:{arg}}} needs a role with scalable = false and count = 1"
                )
            if other.name != role.name and other.name not in _all_dependencies(topology, role):
                raise TopologyError(f"{where} refers to {arg!r} without depending on it")
        if kind == "param" and arg not in topology.params:
            raise TopologyError(f"{where}: no parameter {arg!r} for {text!r}")


def _all_dependencies(topology: Topology, role: Role) -> set[str]:
    found: set[str] = set()
    stack = list(role.depends_on)
    while stack:
        name = stack.pop()
        if name not in found:
            found.add(name)
            stack.extend(topology.role(name).depends_on)
    return found
