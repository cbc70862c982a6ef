"""deploy/services.toml: what it says holds together, and every file rendered from it is current."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deploy import render
from deploy.topology import SOURCE, Topology, TopologyError, load
from services.cli import build_parser

# Variables read by something other than a CLI flag.
NOT_FLAGS = {"KVRELAY_CACHE_DIR"}  # shared/model/loader.py
# Flags services.toml already passes and the services will grow; the test below fails once
# one lands, so that it is removed from here.
PENDING_FLAGS = {"KVRELAY_METRICS_PORT"}  # workers' /metrics, scraped by Prometheus


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load()


def _env_flags(command: str) -> set[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    return {
        "KVRELAY_" + option.lstrip("-").replace("-", "_").upper()
        for action in sub._actions for option in action.option_strings
        if option.startswith("--")
    }


def test_rendered_files_match_services_toml(topology: Topology) -> None:
    stale = render.stale_files(topology)
    assert not stale, f"run `python -m deploy.render`: out of date: {stale}"


def test_every_kvrelay_variable_is_a_flag_of_its_service(topology: Topology) -> None:
    for role in topology.roles.values():
        if not role.is_kvrelay:
            continue
        flags = _env_flags(role.command[1])
        for profile in ("cpu", "gpu"):
            names = {n for n in topology.env_of(role, profile) if n.startswith("KVRELAY_")}
            unknown = names - flags - NOT_FLAGS - PENDING_FLAGS
            assert not unknown, f"{role.name} ({profile}): no such flag for {sorted(unknown)}"
    for pending in PENDING_FLAGS:
        for command in ("prefill", "decode"):
            assert pending not in _env_flags(command), (
                f"{pending} is a flag of `kvrelay {command}` now: drop it from PENDING_FLAGS")


def test_roles_start_in_dependency_order_and_reach_what_they_need(topology: Topology) -> None:
    order = list(topology.roles)
    assert order[0] == "redis" and order[-1] == "gateway"
    gateway_env = topology.env_of(topology.role("gateway"))
    assert gateway_env["KVRELAY_PREFILL_ADDRS"] == "{addrs:prefill}"
    assert gateway_env["KVRELAY_DECODE_ADDRS"] == "{addrs:decode}"
    for name in ("prefill", "decode"):
        env = topology.env_of(topology.role(name), "gpu")
        assert env["KVRELAY_ADVERTISE_HOST"] == "{advertise}"
        assert env["KVRELAY_HOST"] == "0.0.0.0"
        assert env["KVRELAY_DTYPE"] == "bfloat16"  # the GPU profile's
    assert topology.env_of(topology.role("decode"))["KVRELAY_KV_PORT"] == "{port:kv}"
    assert topology.params["api_key"].secret and topology.params["api_key"].default == ""


BROKEN = {
    "missing port": ('KVRELAY_KV_PORT = "{port:kv}"', 'KVRELAY_KV_PORT = "{port:nope}"'),
    "undeclared dependency": ('depends_on = ["redis", "prefill", "decode"]',
                              'depends_on = ["redis", "prefill"]'),
    "unknown parameter": ('"{param:kv_cache_mb}"', '"{param:kv_cache}"'),
    "dependency declared later": ('[roles.prefill]\nimage = "kvrelay"\ngpu = true\n'
                                  'command = ["kvrelay", "prefill"]\ncount = 2\n'
                                  'depends_on = ["redis"]',
                                  '[roles.prefill]\nimage = "kvrelay"\ngpu = true\n'
                                  'command = ["kvrelay", "prefill"]\ncount = 2\n'
                                  'depends_on = ["redis", "decode"]'),
    "addr of a scalable role": ('"redis://{addr:redis}/0"',
                                '"redis://{addr:redis}/0 {addr:prefill}"'),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_inconsistent_services_toml_is_rejected(case: str, tmp_path: Path) -> None:
    old, new = BROKEN[case]
    text = SOURCE.read_text()
    assert old in text, f"the test's anchor for {case!r} is gone from services.toml"
    broken = tmp_path / "services.toml"
    broken.write_text(text.replace(old, new, 1))
    with pytest.raises(TopologyError):
        load(broken)
