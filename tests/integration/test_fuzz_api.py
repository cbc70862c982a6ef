"""Fuzzing the API of a real cluster (tiny model): malformed requests never get a 5xx.

Hypothesis starts from valid chat and text completion bodies and breaks them: fields (the
ones /openapi.json lists, and unknown ones) set to any JSON value, nested fields of
messages, tools and options replaced, fields removed, bodies that are not JSON at all.
Every answer must be a 2xx, or a 4xx in OpenAI's error shape; a stream must end with
[DONE] and carry no error event. /v1/embeddings joins in once the gateway has it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-fuzz"
CONTEXT = 256  # short answers even when a fuzzed body drops max_tokens
EXAMPLES = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model_dir = build_tiny_llama(
        tmp_path_factory.mktemp("tiny-fuzz"), max_position_embeddings=CONTEXT
    )
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("fuzz-cluster"),
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        gateway_args=["--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def endpoints(http: httpx.Client) -> dict[str, list[str]]:
    """Endpoint -> the request fields its OpenAPI schema names."""
    schema = http.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    out: dict[str, list[str]] = {}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        operation = schema["paths"].get(path, {}).get("post")
        if operation is None:
            continue
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        out[path] = sorted(components[ref.rsplit("/", 1)[-1]]["properties"])
    assert {"/v1/chat/completions", "/v1/completions"} <= set(out)
    return out


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    },
    "/v1/completions": {"model": MODEL, "max_tokens": 4, "prompt": "Once upon a time"},
    "/v1/embeddings": {"model": MODEL, "input": "Once upon a time"},
}
# Nested places worth breaking, by endpoint: a path of keys and list indices.
NESTED: dict[str, list[tuple[str | int, ...]]] = {
    "/v1/chat/completions": [
        ("messages", 0),
        ("messages", 1, "role"),
        ("messages", 1, "content"),
        ("messages", 1, "content", 0),
        ("messages", 1, "name"),
        ("messages", 1, "tool_calls"),
        ("messages", 1, "tool_call_id"),
        ("tools", 0),
        ("tools", 0, "function"),
        ("tools", 0, "function", "name"),
        ("tools", 0, "function", "parameters"),
        ("tool_choice",),
        ("tool_choice", "function"),
        ("stream_options", "include_usage"),
        ("logit_bias", "5"),
        ("response_format", "type"),
        ("chat_template_kwargs", "x"),
        ("stop", 0),
    ],
    "/v1/completions": [
        ("prompt", 0),
        ("prompt", 0, 0),
        ("logit_bias", "5"),
        ("stop", 0),
        ("stream_options", "include_usage"),
    ],
    "/v1/embeddings": [("input", 0), ("input", 0, 0)],
}

SURROGATE = "\ud800"
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64 + 5, 49151, 49152])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "",
            "auto",
            "none",
            "required",
            "function",
            "user",
            "assistant",
            "tool",
            "text",
            SURROGATE,
            "x" * 2000,
            "{{ 1/0 }}",
            "<tool_call>",
        ]
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["type", "name", "function", "content", "role", "text", "arguments", "id"]
            )
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _set(body: Any, path: tuple[str | int, ...], value: Any) -> None:
    """Sets body[path] = value, building what is missing on the way (lists and dicts)."""
    node = body
    for key, following in itertools.pairwise(path):
        fresh: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list) and isinstance(key, int):
            while len(node) <= key:
                node.append(fresh)
            if not isinstance(node[key], (list, dict)):
                node[key] = fresh
            node = node[key]
        elif isinstance(node, dict):
            if not isinstance(node.get(key), (list, dict)):
                node[key] = fresh
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, list) and isinstance(last, int):
        while len(node) <= last:
            node.append(None)
        node[last] = value
    elif isinstance(node, dict):
        node[str(last)] = value


@st.composite
def requests(draw: st.DrawFn, endpoints: dict[str, list[str]]) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(endpoints)))
    if draw(st.integers(0, 9)) == 0:  # not a JSON object at all
        raw = draw(
            st.binary(max_size=64)
            | st.sampled_from(
                [b"", b"[]", b"null", b'"x"', b"{", b'{"messages": [', b"[" * 5000, b"\xff\xfe"]
            )
        )
        return path, raw
    body = json.loads(json.dumps(VALID[path]))
    if path == "/v1/chat/completions" and draw(st.booleans()):
        body["tools"] = [json.loads(json.dumps(TOOL))]
    if path != "/v1/embeddings":
        body["stream"] = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "nested", "drop", "unknown"]))
        if kind == "field":
            body[draw(st.sampled_from(endpoints[path]))] = draw(json_values)
        elif kind == "nested":
            _set(body, draw(st.sampled_from(NESTED[path])), draw(json_values))
        elif kind == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        else:
            body[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return path, json.dumps(body, allow_nan=True).encode()


def check(http: httpx.Client, path: str, raw: bytes) -> None:
    headers = {"content-type": "application/json"}
    with http.stream("POST", path, content=raw, headers=headers) as resp:
        body = resp.read().decode("utf-8", errors="replace")
    where = f"POST {path} {raw[:300]!r} -> {resp.status_code} {body[:500]}"
    assert resp.status_code < 500, where
    if resp.status_code >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert error["type"] != "server_error", where
        return
    assert resp.status_code == 200, where
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", where
        for event in events[:-1]:
            assert "error" not in json.loads(event), where
    else:
        assert json.loads(body)["object"] in ("chat.completion", "text_completion", "list"), where


def test_malformed_requests_never_get_a_5xx(
    http: httpx.Client, endpoints: dict[str, list[str]]
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests(endpoints))
    def fuzz(request: tuple[str, bytes]) -> None:
        check(http, *request)

    fuzz()
