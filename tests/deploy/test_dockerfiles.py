"""deploy/docker: what can be checked of the images without a Docker engine.

hadolint lints them; BuildKit's own parser (the `dockerfile` package) reads them, and the
checks below hold them to what the compose and Nomad files expect of the images.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dockerfile
import pytest

from deploy.topology import HEALTHCHECK_PROGRAM, Topology, load

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile.*[!e]"))  # not the .dockerignore files
SECRET_NAMES = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
ids = [f.name for f in DOCKERFILES]
# The project's extras each image installs: NIXL for `--kv-transport nixl` in both, and the
# CUDA path (flashinfer) in the CUDA one.
EXTRAS = {"Dockerfile.cpu": {"nixl"}, "Dockerfile.cuda": {"cuda"}}
PIP_OPTIONS_WITH_VALUE = {
    "--index-url",
    "--extra-index-url",
    "-i",
    "--requirement",
    "-r",
    "--constraint",
    "-c",
}


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


@dataclass(frozen=True)
class PipInstall:
    requirements: tuple[str, ...]  # as pip reads them, build args expanded
    no_deps: bool


def build_args(commands: list[dockerfile.Command]) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])


def pip_installs(path: Path) -> list[PipInstall]:
    """Every `pip install` of the image, in build order."""
    commands = instructions(path)
    args = build_args(commands)
    installs = []
    for command in commands:
        if command.cmd != "RUN":
            continue
        text = re.sub(
            r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), " ".join(command.value)
        )
        for part in text.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["pip", "install"]:
                continue
            requirements = [
                w
                for i, w in enumerate(words[2:], 2)
                if not w.startswith("-") and words[i - 1] not in PIP_OPTIONS_WITH_VALUE
            ]
            installs.append(PipInstall(tuple(requirements), "--no-deps" in words))
    return installs


def project_install(installs: list[PipInstall]) -> int:
    """Index of the install of this project (the build context, `.` or `./[extras]`)."""
    return next(
        i
        for i, install in enumerate(installs)
        if any(r == "." or r.startswith("./") for r in install.requirements)
    )


def project_extras(install: PipInstall) -> set[str]:
    local = next(r for r in install.requirements if r == "." or r.startswith("./"))
    found = re.fullmatch(r"\./?(?:\[([\w,-]+)\])?", local)
    assert found, local
    return set(found.group(1).split(",")) if found.group(1) else set()


def makefile_pinned_no_deps() -> set[str]:
    """`NAME==VERSION` that `make install` installs without their requirements."""
    pinned: set[str] = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        words = line.split()
        if "--no-deps" in words and any(w.endswith("/pip") for w in words):
            pinned.update(w for w in words if "==" in w)
    return pinned


def pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def installed_requirements(path: Path) -> list[str]:
    """What the image's pip installs ask for by name, the project's extras included."""
    installs = pip_installs(path)
    optional = pyproject()["project"]["optional-dependencies"]
    found = [r for install in installs for r in install.requirements if not r.startswith(".")]
    for extra in project_extras(installs[project_install(installs)]):
        found += optional[extra]
    return found


def torch_cuda_major(path: Path) -> int | None:
    """The CUDA major of the image's torch build, read off its wheel index (cpu: None)."""
    index = build_args(instructions(path))["TORCH_INDEX_URL"]
    found = re.search(r"/whl/cu(\d+)(\d)$", index)
    assert found or index.endswith("/whl/cpu"), index
    return int(found.group(1)) if found else None


def test_a_cpu_and_a_cuda_image() -> None:
    assert ids == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
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
    declared = {
        port
        for role in topology.roles.values()
        if role.is_kvrelay
        for name, port in role.ports.items()
        if name != "metrics"
    }
    assert declared <= exposed


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_torch_is_pinned_and_installed_before_the_project(path: Path) -> None:
    runs = [" ".join(c.value) for c in instructions(path) if c.cmd == "RUN"]
    assert any("--index-url" in r and "torch==2.13.0" in r for r in runs), (
        "torch comes from the index of the wanted build"
    )
    installs = pip_installs(path)
    torch = next(i for i, p in enumerate(installs) if "torch==2.13.0" in p.requirements)
    # Everything after it that requires torch (the project, nixl-cu*, flashinfer) finds it.
    assert torch < project_install(installs)


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_image_installs_what_make_install_installs_without_requirements(path: Path) -> None:
    pinned = makefile_pinned_no_deps()
    assert {"nixl==1.5.1", "xgrammar==0.2.8"} <= pinned, "the Makefile's installs moved"
    installs = pip_installs(path)
    project = project_install(installs)
    for requirement in sorted(pinned):
        where = [i for i, p in enumerate(installs) if requirement in p.requirements]
        assert where, f"{requirement} is not installed"
        for i in where:
            assert installs[i].no_deps, f"{requirement} without --no-deps pulls what it must not"
            # Its other requirements are the project's: they must be there already.
            assert i > project, f"{requirement} is installed before the project"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_image_installs_the_project_with_its_extras(path: Path) -> None:
    installs = pip_installs(path)
    extras = project_extras(installs[project_install(installs)])
    assert extras == EXTRAS[path.name]
    assert extras <= set(pyproject()["project"]["optional-dependencies"])


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_image_has_the_nixl_build_of_its_torch_cuda(path: Path) -> None:
    requirements = installed_requirements(path)
    nixl = [r for r in requirements if requirement_name(r) == "nixl"]
    backends = {
        requirement_name(r): r
        for r in requirements
        if re.fullmatch(r"nixl-cu\d+", requirement_name(r))
    }
    assert nixl and backends, "--kv-transport nixl needs nixl and a nixl-cu* build"
    version = nixl[0].split("==")[1]
    for backend in backends.values():
        assert backend.endswith(f"=={version}"), f"{backend}: nixl {version} pins its builds"
    major = torch_cuda_major(path)
    if major is not None:  # without CUDA, nixl loads whichever build is there
        assert f"nixl-cu{major}" in backends, (
            f"torch is a CUDA {major} build: `import nixl` needs nixl-cu{major}, not {backends}"
        )


@pytest.mark.parametrize(("cuda", "backend"), [("13.0", "nixl_cu13"), ("12.8", "nixl_cu12")])
def test_nixl_loads_the_build_of_torchs_cuda_major(cuda: str, backend: str, tmp_path: Path) -> None:
    # Why the test above asks for nixl-cu<major>: a torch whose version.py says this CUDA
    # (nixl reads it off disk) makes the real `nixl` package load that build or fail.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "torch" / "version.py").write_text(f"cuda = {cuda!r}\n")
    probe = (
        "try:\n import nixl\n print(nixl._api.__name__)\nexcept ImportError as exc:\n print(exc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert backend in result.stdout.replace("-", "_"), result.stdout


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
