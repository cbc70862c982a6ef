"""Starts services.toml's roles, each instance on its own namespace host.

Commands, environment and health checks are services.toml's, resolved for this platform:
hosts are namespace addresses, ports are the declared ones shifted by PORT_OFFSET (no
service here ever listens on a well-known port such as 30000 or 6379, even inside a private
namespace), parameters are the run's own. As with compose's `depends_on: service_healthy`,
a role starts once every instance of the roles it depends on passes its health check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.multihost.netns import Host, Network
from deploy.topology import (
    ENTRYPOINT,
    HEALTHCHECK_PROGRAM,
    Param,
    Role,
    Topology,
    TopologyError,
    expand,
)
from services.processes import ChildProcess, ChildProcessError

REPO_ROOT = Path(__file__).resolve().parents[2]
PORT_OFFSET = 1000
HEALTH_POLL_S = 0.5


class NetnsResolver:
    def __init__(self, network: Network, params: dict[str, str]) -> None:
        self.network = network
        self.params = params

    def port(self, role: Role, instance: str, name: str) -> str:
        return str(role.ports[name] + PORT_OFFSET)

    def advertise(self, role: Role, instance: str) -> str:
        return self.network.hosts[instance].address

    def instance(self, role: Role, instance: str) -> str:
        return instance

    def addrs(self, role: Role) -> str:
        port = role.ports[role.service] + PORT_OFFSET
        return ",".join(f"{self.network.hosts[i].address}:{port}" for i in role.instances())

    def param(self, param: Param) -> str:
        value = self.params.get(param.name, param.default)
        if param.required and not value:
            raise TopologyError(f"the run sets no {param.name} (required)")
        return value


def local_program(argv: list[str]) -> list[str]:
    """The image's programs, as this checkout runs them."""
    program, rest = argv[0], argv[1:]
    if program == ENTRYPOINT:
        return [sys.executable, "-m", "services.cli", *rest]
    if program == HEALTHCHECK_PROGRAM:
        return [sys.executable, str(REPO_ROOT / "deploy" / "healthcheck.py"), *rest]
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(f"{program} is not installed")
    return [found, *rest]


@dataclass
class Service:
    role: Role
    instance: str
    host: Host
    process: ChildProcess
    health_argv: list[str]

    def healthy(self) -> bool:
        result = subprocess.run(
            self.host.exec_argv(self.health_argv),
            capture_output=True,
            timeout=30,
            env={**os.environ, **child_env({})},
            cwd=REPO_ROOT,
        )
        return result.returncode == 0


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Added to the runner's environment (ChildProcess keeps that, for PATH and the like)."""
    return {"PYTHONPATH": str(REPO_ROOT), **extra}


@dataclass
class MultiHostCluster:
    topology: Topology
    network: Network
    params: dict[str, str]
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # on top of services.toml's
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def resolver(self) -> NetnsResolver:
        return NetnsResolver(self.network, self.params)

    def command(self, role: Role, instance: str) -> list[str]:
        return [expand(a, self.topology, role, instance, self.resolver) for a in role.command]

    def environment(self, role: Role, instance: str) -> dict[str, str]:
        return {
            k: expand(v, self.topology, role, instance, self.resolver)
            for k, v in self.topology.env_of(role, "cpu").items()
        }

    def url(self, role_name: str, port: str) -> str:
        role = self.topology.role(role_name)
        host = self.network.hosts[role.instances()[0]]
        return f"http://{host.address}:{role.ports[port] + PORT_OFFSET}"

    def start(self, timeout_s: float = 120.0) -> None:
        """Every role, each as soon as all the roles it depends on are healthy (as compose)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        healthy: set[str] = set()
        pending = list(self.topology.roles.values())
        while pending:
            ready = [role for role in pending if set(role.depends_on) <= healthy]
            started = [
                self._start_one(role, instance) for role in ready for instance in role.instances()
            ]
            self._wait_healthy(started, deadline)
            healthy.update(role.name for role in ready)
            pending = [role for role in pending if role not in ready]

    def _start_one(self, role: Role, instance: str) -> Service:
        host = self.network.hosts[instance]
        env = child_env({**self.environment(role, instance), **self.extra_env})
        argv = host.exec_argv(local_program(self.command(role, instance)))
        process = ChildProcess(instance, argv, env, log_path=self.log_dir / f"{instance}.log")
        health_port = str(role.ports[role.health.port] + PORT_OFFSET)
        service = Service(
            role, instance, host, process, local_program(role.health.command(health_port))
        )
        self.services[instance] = service
        process.start()
        return service

    def _wait_healthy(self, services: list[Service], deadline: float) -> None:
        """Until every one passes its health check; fails as soon as one has exited."""
        pending = list(services)
        while pending:
            for service in services:  # a dead one fails the start, whatever the others do
                if not service.process.alive():
                    raise ChildProcessError(
                        f"{service.instance} exited with code {service.process.returncode()}"
                        f" (log: {service.process.log_path})"
                    )
            pending = [service for service in pending if not service.healthy()]
            if pending and time.monotonic() > deadline:
                names = ", ".join(service.instance for service in pending)
                raise ChildProcessError(f"not healthy in time: {names} (logs: {self.log_dir})")
            if pending:
                time.sleep(HEALTH_POLL_S)

    def kill(self, instance: str) -> None:
        """The process dies at once (SIGKILL), as when its host loses power."""
        process = self.services[instance].process
        if process.process is not None and process.alive():
            process.process.kill()
            process.process.wait(timeout=10)

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.process.stop(grace_s=5.0)

    def logs(self, tail_chars: int = 3000) -> str:
        parts = []
        for service in self.services.values():
            path = service.process.log_path
            if path is not None and path.exists():
                parts.append(
                    f"--- {service.instance} ---\n{path.read_text(errors='replace')[-tail_chars:]}"
                )
        return "\n".join(parts)
