"""kvrelay across hosts: each service in its own network namespace, on a private switch.

Runs where root and `ip netns` are available (CI); elsewhere it is skipped with the reason.
The services start from deploy/services.toml (the compose and Nomad files' source) with a
tiny model; see deploy/multihost/scenario.py for the phases.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from deploy.multihost import netns
from deploy.multihost.__main__ import build_tiny_model
from deploy.multihost.scenario import (
    CUT_PREFILL,
    KILLED_DECODE,
    MultiHostScenario,
    Report,
    kv_bytes_per_token,
)
from deploy.topology import load

REASON = netns.unavailable_reason()
if REASON is not None:
    warnings.warn(f"multi-host tests skipped: {REASON}", stacklevel=1)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host: {REASON}")


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tag = f"{netns.PREFIX}{os.getpid()}-"
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag)]


def _service_processes() -> list[psutil.Process]:
    """kvrelay services and redis-servers started inside our namespaces (by argv)."""
    tag = f"{netns.PREFIX}{os.getpid()}-"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (
            len(cmdline) > 3
            and cmdline[:3] == ["ip", "netns", "exec"]
            and cmdline[3].startswith(tag)
        ):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("multihost-model") / "tiny-llama")


@pytest.fixture(scope="module")
def report(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    scenario = MultiHostScenario(
        tiny_model, kv_bytes_per_token(tiny_model), tmp_path_factory.mktemp("multihost")
    )
    try:
        result = scenario.run()
    except Exception as exc:
        raise AssertionError(f"multi-host run failed: {exc}\n{scenario.logs()}") from exc
    yield result


@pytest.mark.timeout(180)
def test_kv_crosses_from_prefill_hosts_to_decode_hosts_not_through_the_gateway(
    report: Report,
) -> None:
    relay = report.phases["relay"]
    assert relay.ok == relay.spec.requests, relay.results
    kv = report.relay_kv_bytes
    traffic = report.relay_traffic
    sent = sum(t["tx_bytes"] for host, t in traffic.items() if host.startswith("prefill"))
    received = sum(t["rx_bytes"] for host, t in traffic.items() if host.startswith("decode"))
    assert sent >= kv and received >= kv, (kv, traffic)
    # Everything else is token ids and text: tiny next to the KV.
    gateway = traffic["gateway"]["rx_bytes"] + traffic["gateway"]["tx_bytes"]
    assert gateway < kv / 20, (kv, traffic)
    assert traffic["redis"]["rx_bytes"] + traffic["redis"]["tx_bytes"] < kv / 20, traffic


def test_workers_refuse_a_host_without_the_internal_token(report: Report) -> None:
    # Every service got the run's token from services.toml (the relay phase needs it on the
    # gateway and on both ends of the KV channel); a host without it is refused.
    assert report.tokenless_calls == {"prefill-0": "UNAUTHENTICATED", "decode-0": "UNAUTHENTICATED"}


def test_cluster_answers_with_a_prefill_host_cut_off(report: Report) -> None:
    cut = report.phases["cut"]
    assert cut.ok == cut.spec.requests, cut.results
    health = report.health["after_cut"]["prefill"]
    assert health[report.addresses[CUT_PREFILL]] is False, health
    assert health[report.addresses["prefill-0"]] is True, health


def test_cluster_answers_when_a_decode_process_dies_mid_stream(report: Report) -> None:
    kill = report.phases["kill"]
    assert kill.summary["unfinished"] == 0, kill.summary  # nothing hangs
    failures = [r for r in kill.results if not r["ok"]]
    # Only answers already streaming from the killed worker may fail, and cleanly (503).
    assert len(failures) <= kill.spec.concurrency, failures
    for failure in failures:
        assert failure["error"] == "service_unavailable_error", failure
        assert "decode worker" in failure["message"], failure
    health = report.health["after_kill"]["decode"]
    assert health[report.addresses[KILLED_DECODE]] is False, health
    assert health[report.addresses["decode-1"]] is True, health
    after = report.phases["after"]
    assert after.ok == after.spec.requests, after.results


def test_run_leaves_no_namespace_or_process_behind(report: Report) -> None:
    assert report.phases  # the run is over: its fixture removed everything
    assert _our_namespaces() == []
    assert _service_processes() == []


def test_run_cleans_up_when_a_service_cannot_start(tiny_model: Path, tmp_path: Path) -> None:
    # decode fails at once (a bad flag) while redis runs and the prefill workers start.
    topology = load()
    decode = topology.roles["decode"]
    broken = replace(
        topology,
        roles={
            **topology.roles,
            "decode": replace(decode, command=(*decode.command, "--no-such-flag")),
        },
    )
    scenario = MultiHostScenario(tiny_model, 1, tmp_path / "run", topology=broken)
    with pytest.raises(Exception, match="decode-0 exited with code 2"):
        scenario.run()
    assert scenario.cluster is not None and "prefill-0" in scenario.cluster.services
    assert _our_namespaces() == []
    assert _service_processes() == []


def test_a_cut_link_drops_traffic_and_counters_count_bytes() -> None:
    with netns.Network() as network:
        server = network.add_host("server")
        client = network.add_host("client")
        listener = subprocess.Popen(
            server.exec_argv(
                [
                    "python3",
                    "-c",
                    "import socket; s = socket.socket(); "
                    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                    f"s.bind(('{server.address}', 7000)); s.listen(); "
                    "c, _ = s.accept(); n = 0\nwhile (d := c.recv(65536)): n += len(d)\nprint(n)",
                ]
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            send = (
                "import socket, time\nfor _ in range(50):\n try:\n"
                f"  s = socket.create_connection(('{server.address}', 7000), 1); break\n"
                " except OSError: time.sleep(0.1)\n"
                "s.sendall(b'x' * 1_000_000); s.close()"
            )
            before = network.counters(server)
            subprocess.run(client.exec_argv(["python3", "-c", send]), check=True, timeout=30)
            out, _ = listener.communicate(timeout=30)
            assert int(out) == 1_000_000
            assert network.counters(server).rx_bytes - before.rx_bytes >= 1_000_000
            network.cut(server)
            probe = (
                "import socket\ntry:\n"
                f" socket.create_connection(('{server.address}', 7000), 1)\n"
                "except TimeoutError: raise SystemExit(3)\n"
                "except OSError: raise SystemExit(4)"
            )
            result = subprocess.run(client.exec_argv(["python3", "-c", probe]), timeout=30)
            # No answer at all through a cut link: not even the refusal of a closed port.
            assert result.returncode == 3
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        names = [host.netns for host in network.hosts.values()] + [network.switch]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
