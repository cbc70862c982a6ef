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
PENDING_FLAGS: set[str] = set()


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load()


def _subcommand(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = commands.choices[command]
    return sub


def _env_flags(command: str) -> set[str]:
    sub = _subcommand(command)
    return {
        "KVRELAY_" + option.lstrip("-").replace("-", "_").upper()
        for action in sub._actions
        for option in action.option_strings
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
                f"{pending} is a flag of `kvrelay {command}` now: drop it from PENDING_FLAGS"
            )


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


def test_every_kvrelay_service_gets_the_deployers_internal_token(topology: Topology) -> None:
    token = topology.params["internal_token"]
    assert token.env == "KVRELAY_INTERNAL_TOKEN"
    assert token.secret and token.required and token.default == ""
    for role in topology.roles.values():
        for profile in ("cpu", "gpu"):
            env = topology.env_of(role, profile)
            expected = "{param:internal_token}" if role.is_kvrelay else None
            assert env.get("KVRELAY_INTERNAL_TOKEN") == expected, (role.name, profile)
    assert {r.name for r in topology.roles.values() if r.is_kvrelay} == {
        "prefill",
        "decode",
        "gateway",
    }


def test_optional_flags_pass_through_with_the_services_own_defaults(topology: Topology) -> None:
    gateway = topology.env_of(topology.role("gateway"))
    # Empty: the gateway reads the tool call format off the chat template, no reasoning parser.
    for variable, param in (
        ("KVRELAY_TOOL_CALL_PARSER", "tool_call_parser"),
        ("KVRELAY_REASONING_PARSER", "reasoning_parser"),
    ):
        assert gateway[variable] == f"{{param:{param}}}"
        assert topology.params[param].default == ""
    defaults = {a.dest: a.default for a in _subcommand("prefill")._actions}
    for name in ("prefill", "decode"):
        assert topology.env_of(topology.role(name))["KVRELAY_KV_TRANSPORT"] == (
            "{param:kv_transport}"
        )
    assert topology.params["kv_transport"].default == defaults["kv_transport"]


BROKEN = {
    "missing port": ('KVRELAY_KV_PORT = "{port:kv}"', 'KVRELAY_KV_PORT = "{port:nope}"'),
    "undeclared dependency": (
        'depends_on = ["redis", "prefill", "decode"]',
        'depends_on = ["redis", "prefill"]',
    ),
    "unknown parameter": ('"{param:kv_cache_mb}"', '"{param:kv_cache}"'),
    "dependency declared later": (
        '[roles.prefill]\nimage = "kvrelay"\ngpu = true\n'
        'command = ["kvrelay", "prefill"]\ncount = 2\n'
        'depends_on = ["redis"]',
        '[roles.prefill]\nimage = "kvrelay"\ngpu = true\n'
        'command = ["kvrelay", "prefill"]\ncount = 2\n'
        'depends_on = ["redis", "decode"]',
    ),
    "addr of a scalable role": (
        '"redis://{addr:redis}/0"',
        '"redis://{addr:redis}/0 {addr:prefill}"',
    ),
    "required parameter with a default": (
        'default = ""\nsecret = true\nrequired = true',
        'default = "x"\nsecret = true\nrequired = true',
    ),
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
