"""Hosts on one machine: a network namespace each, linked to a private switch.

The switch is a bridge inside a namespace of its own, so nothing is attached to the
machine's own network: traffic between the hosts stays inside the namespaces made here.
Every name carries the creating process's id; `remove_stale()` deletes what a killed run
left behind. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

PREFIX = "kvr"
HOST_IFACE = "eth0"
SWITCH = "sw"
BRIDGE = "br0"
# Addresses of the hosts of one run; nothing outside its switch can reach them.
SUBNET = "10.213.0"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip netns`), or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (OSError, NetnsError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    _ip("netns", "delete", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    result = _ip("-json", "netns", "list", check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(result.stdout)]


def remove_stale() -> list[str]:
    """Deletes namespaces of earlier runs whose process is gone (their veths go with them)."""
    removed = []
    for name in _namespaces():
        match = _NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    name: str  # the service instance it runs, e.g. "prefill-0"
    netns: str
    address: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass(frozen=True)
class LinkCounters:
    rx_bytes: int
    tx_bytes: int


class Network:
    """A switch namespace with a bridge, and hosts plugged into it by veth pairs."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-{SWITCH}"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", self.switch, "link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        if len(name) > 15:  # it names the switch port: an interface name
            raise NetnsError(f"host name {name!r} is longer than 15 characters")
        netns = f"{self.tag}-{name}"
        address = f"{SUBNET}.{len(self.hosts) + 10}"
        self._add_namespace(netns)
        # Both ends are made inside the namespaces: nothing touches the machine's own.
        _ip("-n", netns, "link", "add", HOST_IFACE, "type", "veth",
            "peer", "name", name, "netns", self.switch)
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", HOST_IFACE)
        _ip("-n", netns, "link", "set", HOST_IFACE, "up")
        _ip("-n", self.switch, "link", "set", name, "master", BRIDGE)
        _ip("-n", self.switch, "link", "set", name, "up")
        host = Host(name, netns, address)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Unplugs the host from the switch: its packets are dropped, with no reset."""
        _ip("-n", self.switch, "link", "set", host.name, "down")

    def counters(self, host: Host) -> LinkCounters:
        """Bytes through the host's network interface, as the kernel counts them."""
        out = _ip("-n", host.netns, "-s", "-json", "link", "show", HOST_IFACE).stdout
        stats = json.loads(out)[0]["stats64"]
        return LinkCounters(int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))

    def close(self) -> None:
        """Deletes every namespace made here; their veth pairs and the bridge go with them."""
        for name in reversed(self._namespaces):
            with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
                _ip("netns", "delete", name, check=False)
        self._namespaces.clear()
        self.hosts.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
