"""Chat from Node through the official `openai` npm package (pinned in tests/node/), against
the cluster of test_tools_e2e (its tiny model writes reasoning and a tool call), with an
API key: whole and streamed answers, and an error.

The package is installed with `npm ci` from tests/node/package-lock.json into a temporary
folder. Node 20+ and npm are part of the test environment: without them this test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.integration.test_tools_e2e import (
    ARGS_1,
    ARGS_2,
    ASK,
    MODEL,
    PREAMBLE,
    REASONING,
    WEATHER_TOOL,
    build_scripted_tool_model,
    start_tools_cluster,
)

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
KEY = "sk-node-test"
NPM_TIMEOUT_S = 300


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: Node.js 20+ with npm is needed for this test")
    return path


@pytest.fixture(scope="module")
def node_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = _tool("node"), _tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.fail(f"Node.js 20+ is needed, found {version.stdout.strip()}")
    project = tmp_path_factory.mktemp("node-client")
    for name in ("package.json", "package-lock.json", "chat.mjs"):
        shutil.copyfile(NODE_DIR / name, project / name)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"
    return project


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model_dir = build_scripted_tool_model(tmp_path_factory.mktemp("tiny-tools-node"))
    cluster = start_tools_cluster(
        model_dir, tmp_path_factory.mktemp("node-cluster"), "--api-key", KEY
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def run_node(project: Path, cluster: Cluster, request: dict[str, Any]) -> dict[str, Any]:
    env = {
        **os.environ,
        "KVRELAY_BASE_URL": cluster.base_url,
        "KVRELAY_API_KEY": KEY,
        "KVRELAY_REQUEST": json.dumps(request),
    }
    done = subprocess.run(
        [_tool("node"), "chat.mjs"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"node failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_node_chat_with_tool_call_and_reasoning(node_project: Path, cluster: Cluster) -> None:
    request = {
        "model": MODEL,
        "messages": ASK,
        "temperature": 0,
        "max_tokens": 32,
        "tools": [WEATHER_TOOL],
    }
    result = run_node(node_project, cluster, request)
    expected = {
        "content": PREAMBLE,
        "reasoning": REASONING,
        "calls": [["function", "get_weather", ARGS_1 + ARGS_2[:-1]]],
        "finish_reason": "tool_calls",
    }
    assert result["whole"] == expected
    assert result["streamed"] == expected
    assert result["helper"] == expected  # the SDK's own accumulation of our chunks
    assert result["stream_call_ids"][0].startswith("call_")
    assert result["stream_usage"]["completion_tokens"] == 10
    error = result["error"]
    assert error["status"] == 400 and error["is_bad_request"]
    assert error["body"]["param"] == "max_tokens"


def test_node_chat_plain_text(node_project: Path, cluster: Cluster) -> None:
    # No tools: the call is text, and only the reasoning is apart.
    request = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 5}
    result = run_node(node_project, cluster, request)
    assert result["whole"] == result["streamed"] == result["helper"]
    assert result["whole"]["content"] == f"{PREAMBLE}<tool_call>"
    assert result["whole"]["finish_reason"] == "length"
    assert result["stream_chunks"] >= 4
