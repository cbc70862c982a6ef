"""deploy/docker: what can be checked of the images without a Docker engine.

hadolint lints them; BuildKit's own parser (the `dockerfile` package) reads them, and the
checks below hold them to what the compose and Nomad files expect of the images.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from deploy.topology import HEALTHCHECK_PROGRAM, Topology, load

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile.*[!e]"))  # not the .dockerignore files
SECRET_NAMES = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
ids = [f.name for f in DOCKERFILES]


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load()


def instructions(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def final_stage(commands: list[dockerfile.Command]) -> list[dockerfile.Command]:
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def env_of(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            values = list(command.value)
            env.update(zip(values[::2], values[1::2], strict=True))
    return env


def test_a_cpu_and_a_cuda_image() -> None:
    assert ids == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_multi_stage_build_runs_as_a_non_root_user(path: Path) -> None:
    commands = instructions(path)
    stages = [c for c in commands if c.cmd == "FROM"]
    assert len(stages) >= 2, "build tools stay in the build stage"
    final = final_stage(commands)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), users
    copies_from_build = [c for c in final if c.cmd == "COPY" and "--from=build" in c.flags]
    assert copies_from_build, "the runtime stage takes the built venv from the build stage"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_image_checks_its_health_and_keeps_model_and_cache_in_volumes(
    path: Path, topology: Topology
) -> None:
    final = final_stage(instructions(path))
    healthchecks = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert healthchecks[0].value[:2] == ("CMD", HEALTHCHECK_PROGRAM)
    volumes = {v for c in final if c.cmd == "VOLUME" for v in c.value}
    cache_dir = topology.params["cache_dir"].default
    assert {cache_dir, topology.kvrelay_volumes["models"]} <= volumes
    env = env_of(final)
    assert env["KVRELAY_CACHE_DIR"] == cache_dir
    assert env["HF_HOME"] == f"{cache_dir}/hf"
    entrypoint = [c.value for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint == [("kvrelay",)], "compose and Nomad pass `gateway`, `prefill`... as args"
    exposed = {int(p) for c in final if c.cmd == "EXPOSE" for p in c.value}
    declared = {port for role in topology.roles.values() if role.is_kvrelay
                for name, port in role.ports.items() if name != "metrics"}
    assert declared <= exposed


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_torch_is_pinned_and_installed_before_the_project(path: Path) -> None:
    runs = [" ".join(c.value) for c in instructions(path) if c.cmd == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    project_install = re.compile(r"pip install .*--no-cache-dir \.")
    project = next(i for i, r in enumerate(runs) if project_install.search(r))
    assert torch < project
    assert "--index-url" in runs[torch], "torch comes from the index of the wanted build"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_default_model_link_is_the_deploy_default(path: Path, topology: Topology) -> None:
    runs = " ".join(" ".join(c.value) for c in instructions(path) if c.cmd == "RUN")
    assert topology.params["model_path"].default in runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_no_secret_is_baked_in(path: Path) -> None:
    for command in instructions(path):
        if command.cmd in ("ENV", "ARG"):
            text = " ".join(command.value)
            assert not SECRET_NAMES.search(text), f"{command.cmd} {text}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_what_the_image_copies_exists_and_passes_the_dockerignore(path: Path) -> None:
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]

    def included(relative: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(relative, bare) or relative.startswith(bare + "/") or bare == "**":
                keep = negated
        return keep

    for command in instructions(path):
        if command.cmd != "COPY" or any(f.startswith("--from") for f in command.flags):
            continue
        for source in command.value[:-1]:
            assert (REPO / source).exists(), source
            assert included(source.rstrip("/")), f"{source} is excluded by the .dockerignore"
