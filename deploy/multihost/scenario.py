"""The multi-host run: kvrelay on namespace hosts, KV over the links, then hosts failing.

Hosts: redis, prefill-0, prefill-1, decode-0, decode-1, gateway (services.toml's roles and
counts) and a client. Phases:
  relay  requests through the gateway; interface counters show the KV crossing from the
         prefill hosts to the decode hosts, and not through the gateway's link
  cut    prefill-1 is unplugged from the switch; requests keep being answered
  kill   decode-0 is SIGKILLed while requests stream; requests keep being answered
  after  fresh requests on what is left (prefill-0, decode-1) all succeed
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.multihost.netns import Host, LinkCounters, Network, remove_stale
from deploy.multihost.services import REPO_ROOT, MultiHostCluster, child_env
from deploy.topology import Topology, load
from shared.model.loader import cache_root

CLIENT = "client"
CUT_PREFILL = "prefill-1"
KILLED_DECODE = "decode-0"
KILL_AFTER_RESULTS = 2  # kill decode once this many requests of the phase have finished


@dataclass
class LoadSpec:
    requests: int
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    seed: int


@dataclass
class Phase:
    name: str
    spec: LoadSpec
    results: list[dict[str, Any]]
    summary: dict[str, int]
    seconds: float

    @property
    def ok(self) -> int:
        return sum(bool(r["ok"]) for r in self.results)


@dataclass
class Report:
    kv_bytes_per_token: int
    phases: dict[str, Phase] = field(default_factory=dict)
    relay_traffic: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> rx/tx
    health: dict[str, Any] = field(default_factory=dict)  # gateway /health after each fault
    addresses: dict[str, str] = field(default_factory=dict)  # instance -> its service's host:port
    # instance -> the gRPC status of a call from the client host without the internal token
    tokenless_calls: dict[str, str] = field(default_factory=dict)
    startup_s: float = 0.0

    @property
    def relay_kv_bytes(self) -> int:
        """The least KV the relay phase must move: every prompt token, once."""
        spec = self.phases["relay"].spec
        return spec.requests * spec.prompt_tokens * self.kv_bytes_per_token

    def to_json(self) -> dict[str, Any]:
        return {
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "relay_kv_bytes_at_least": self.relay_kv_bytes if "relay" in self.phases else None,
            "relay_traffic": self.relay_traffic,
            "health": self.health,
            "addresses": self.addresses,
            "tokenless_calls": self.tokenless_calls,
            "startup_s": self.startup_s,
            "phases": {name: {**asdict(p), "ok": p.ok} for name, p in self.phases.items()},
        }


PHASES = {
    "relay": LoadSpec(requests=8, concurrency=4, prompt_tokens=768, max_tokens=8, seed=1),
    "cut": LoadSpec(requests=8, concurrency=4, prompt_tokens=256, max_tokens=16, seed=2),
    "kill": LoadSpec(requests=12, concurrency=4, prompt_tokens=128, max_tokens=160, seed=3),
    "after": LoadSpec(requests=8, concurrency=4, prompt_tokens=256, max_tokens=16, seed=4),
}


class MultiHostScenario:
    def __init__(
        self,
        model_dir: Path,
        kv_bytes_per_token: int,
        workdir: Path,
        topology: Topology | None = None,
        progress: Callable[[str], None] = lambda message: None,
        request_timeout_s: float = 60.0,
    ) -> None:
        self.topology = topology or load()
        self.model_dir = model_dir
        self.workdir = workdir
        self.progress = progress
        self.request_timeout_s = request_timeout_s
        self.report = Report(kv_bytes_per_token)
        self.network: Network | None = None
        self.cluster: MultiHostCluster | None = None
        self._cut_done = False

    # -- the run ------------------------------------------------------------------------

    def run(self) -> Report:
        """All phases; whatever happens, every process and namespace made here is removed."""
        remove_stale()
        try:
            self._start()
            self._relay()
            self._cut()
            self._kill()
            self._after()
        finally:
            self.close()
        return self.report

    def close(self) -> None:
        if self.cluster is not None:
            if CUT_PREFILL in self.cluster.services and self._cut_done:
                # Unreachable: its graceful stop would wait for calls it can no longer hear
                # being cancelled.
                self.cluster.kill(CUT_PREFILL)
            self.cluster.stop()
        if self.network is not None:
            self.network.close()

    def logs(self) -> str:
        return self.cluster.logs() if self.cluster is not None else ""

    def _start(self) -> None:
        started = time.monotonic()
        self.network = Network()
        for role in self.topology.roles.values():
            for instance in role.instances():
                self.network.add_host(instance)
        self.network.add_host(CLIENT)
        params = {
            "model_path": str(self.model_dir),
            "cache_dir": str(cache_root()),
            "kv_cache_mb": "64",
            "torch_threads": "1",  # seven processes share this machine's cores
            "log_level": "info",
            "internal_token": secrets.token_hex(16),  # one per run, as a deployer would
        }
        self.cluster = MultiHostCluster(self.topology, self.network, params, self.workdir / "logs")
        for role in self.topology.roles.values():
            port = self.cluster.resolver.port(role, role.name, role.service)
            for instance in role.instances():
                self.report.addresses[instance] = f"{self.network.hosts[instance].address}:{port}"
        self.progress("starting redis, 2 prefill, 2 decode and the gateway on their hosts")
        self.cluster.start()
        self._wait_health(prefill=2, decode=2)
        self.report.startup_s = time.monotonic() - started
        self._call_without_token()

    def _call_without_token(self) -> None:
        """A worker call from the client host, which lacks the token: the workers refuse it."""
        for instance in ("prefill-0", "decode-0"):
            argv = self._client_argv(
                "tokenless", self.report.addresses[instance], "--role", instance.split("-")[0]
            )
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=_runner_env()
            )
            lines = result.stdout.strip().splitlines()
            if result.returncode != 0 or not lines:
                raise AssertionError(f"tokenless call to {instance} failed: {result.stderr}")
            self.report.tokenless_calls[instance] = str(json.loads(lines[-1])["code"])

    def _relay(self) -> None:
        assert self.network is not None
        self.progress("relay: requests through the gateway, KV across the links")
        hosts = [h for h in self.network.hosts.values() if h.name != CLIENT]
        before = {h.name: self.network.counters(h) for h in hosts}
        self._load("relay")
        after = {h.name: self.network.counters(h) for h in hosts}
        self.report.relay_traffic = {name: _delta(before[name], after[name]) for name in before}

    def _cut(self) -> None:
        assert self.network is not None
        self.progress(f"cut: {CUT_PREFILL} unplugged from the switch")
        self.network.cut(self.network.hosts[CUT_PREFILL])
        self._cut_done = True
        self._load("cut")
        self.report.health["after_cut"] = self._wait_health(prefill=1, decode=2)

    def _kill(self) -> None:
        assert self.cluster is not None
        self.progress(f"kill: {KILLED_DECODE} killed while answers stream")

        def on_result(count: int) -> None:
            if count == KILL_AFTER_RESULTS:
                assert self.cluster is not None
                self.cluster.kill(KILLED_DECODE)

        self._load("kill", on_result)
        self.report.health["after_kill"] = self._wait_health(prefill=1, decode=1)

    def _after(self) -> None:
        self.progress("after: fresh requests on prefill-0 and decode-1")
        self._load("after")

    # -- the client host ------------------------------------------------------------------

    def _client_argv(self, *args: str) -> list[str]:
        assert self.network is not None
        host: Host = self.network.hosts[CLIENT]
        return host.exec_argv([sys.executable, "-m", "deploy.multihost.client", *args])

    def _gateway_url(self) -> str:
        assert self.cluster is not None
        return self.cluster.url("gateway", "http")

    def _wait_health(self, *, prefill: int, decode: int) -> dict[str, Any]:
        argv = self._client_argv(
            "health",
            self._gateway_url(),
            "--prefill",
            str(prefill),
            "--decode",
            str(decode),
            "--timeout-s",
            "60",
        )
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=90, cwd=REPO_ROOT, env=_runner_env()
        )
        body: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1] or "{}")
        if result.returncode != 0:
            raise AssertionError(
                f"the gateway never showed {prefill} prefill and {decode} decode workers "
                f"healthy; last /health: {body} {result.stderr[-2000:]}"
            )
        return body

    def _load(self, name: str, on_result: Callable[[int], None] | None = None) -> Phase:
        spec = PHASES[name]
        argv = self._client_argv(
            "load",
            self._gateway_url(),
            "--requests",
            str(spec.requests),
            "--concurrency",
            str(spec.concurrency),
            "--prompt-tokens",
            str(spec.prompt_tokens),
            "--max-tokens",
            str(spec.max_tokens),
            "--seed",
            str(spec.seed),
            "--timeout-s",
            str(self.request_timeout_s),
        )
        started = time.monotonic()
        results: list[dict[str, Any]] = []
        summary: dict[str, int] = {}
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=_runner_env(),
        ) as client:
            assert client.stdout is not None
            try:
                for line in client.stdout:  # the client bounds itself by --timeout-s
                    record = json.loads(line)
                    if "summary" in record:
                        summary = record["summary"]
                        continue
                    results.append(record)
                    if on_result is not None:
                        on_result(len(results))
                client.wait(timeout=30)
            finally:
                if client.poll() is None:
                    client.kill()
            stderr = client.stderr.read() if client.stderr else ""
        if not summary:
            raise AssertionError(f"the {name} load client ended without a summary: {stderr}")
        phase = Phase(name, spec, results, summary, time.monotonic() - started)
        self.report.phases[name] = phase
        return phase


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    """KV of one token: layers x (K, V) x KV heads x head size x bytes (float32 by default)."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return int(config["num_hidden_layers"]) * 2 * kv_heads * head_dim * dtype_bytes


def _delta(before: LinkCounters, after: LinkCounters) -> dict[str, int]:
    return {
        "rx_bytes": after.rx_bytes - before.rx_bytes,
        "tx_bytes": after.tx_bytes - before.tx_bytes,
    }


def _runner_env() -> dict[str, str]:
    return {**os.environ, **child_env({})}
