"""Client mistakes get OpenAI-shaped 4xx errors, without any worker running.

The app is the real one; its prefill and decode addresses point at a closed local port,
so whatever gets past validation fails with a 503 (and /health is 503).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import openai
import pytest
from fastapi.testclient import TestClient

from services.gateway.config import GatewayConfig
from services.gateway.protocol import CompletionRequest
from services.gateway.sampling import build_plan
from services.gateway.server import create_app
from services.gateway.tokenizer import load_model_info
from services.processes import free_port
from shared.config import DEFAULT_MODEL_NAME
from shared.rpc.convert import sampling_from_pb
from shared.sampler import SamplingParams

MODEL = "test-model"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello!"}]


def _config(model_dir: Path, **overrides: Any) -> GatewayConfig:
    # Nothing listens on a port that free_port() just let go of.
    dead = f"127.0.0.1:{free_port()}"
    fields: dict[str, Any] = {
        "prefill_addrs": [dead],
        "decode_addrs": [dead],
        "model_path": str(model_dir),
        "served_model_name": MODEL,
        "request_timeout_s": 10.0,
    }
    fields.update(overrides)
    return GatewayConfig(**fields)


@pytest.fixture(scope="module")
def client(default_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_config(default_model_dir))) as c:
        yield c


@pytest.fixture(scope="module")
def max_context(client: TestClient) -> int:
    resp = client.get(f"/v1/models/{MODEL}")
    assert resp.status_code == 200
    value: int = resp.json()["max_model_len"]
    return value


class _Response(Protocol):
    """httpx's Response, or the one of Starlette's TestClient (which may be httpx2's)."""

    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def assert_openai_error(resp: _Response, status: int, param: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if 400 <= status < 500 and status not in (401, 404):
        assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    message: str = err["message"]
    return message


# --- model names ------------------------------------------------------------------------


def test_unknown_model_is_404(client: TestClient) -> None:
    for path, body in (
        (CHAT, {"model": "gpt-17", "messages": HELLO}),
        (COMPLETIONS, {"model": "gpt-17", "prompt": "hi"}),
    ):
        resp = client.post(path, json=body)
        assert_openai_error(resp, 404, "model")
        assert resp.json()["error"]["code"] == "model_not_found"
    resp = client.get("/v1/models/gpt-17")
    assert_openai_error(resp, 404)
    assert resp.json()["error"]["code"] == "model_not_found"


def test_models_listing(client: TestClient, max_context: int) -> None:
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert card["owned_by"] == "kvrelay"
    assert isinstance(card["created"], int)
    assert card["max_model_len"] == max_context > 0
    assert client.get(f"/v1/models/{MODEL}").json() == card


def test_default_served_model_name(default_model_dir: Path) -> None:
    cfg = _config(default_model_dir, model_path=None, served_model_name=None)
    with TestClient(create_app(cfg)) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME


# --- request bodies ---------------------------------------------------------------------


def test_empty_messages(client: TestClient) -> None:
    assert_openai_error(client.post(CHAT, json={"model": MODEL, "messages": []}), 400, "messages")


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_must_be_positive(client: TestClient, value: int) -> None:
    resp = client.post(CHAT, json={"model": MODEL, "messages": HELLO, "max_tokens": value})
    assert_openai_error(resp, 400, "max_tokens")
    resp = client.post(
        CHAT, json={"model": MODEL, "messages": HELLO, "max_completion_tokens": value}
    )
    assert_openai_error(resp, 400, "max_completion_tokens")
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi", "max_tokens": value})
    assert_openai_error(resp, 400, "max_tokens")


def test_prompt_longer_than_context(client: TestClient, max_context: int) -> None:
    long_text = "hello " * (max_context + 50)
    resp = client.post(
        CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_text}]}
    )
    message = assert_openai_error(resp, 400)
    assert str(max_context) in message
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": long_text, "max_tokens": 5})
    message = assert_openai_error(resp, 400)
    assert str(max_context) in message


def test_prompt_plus_max_tokens_longer_than_context(client: TestClient, max_context: int) -> None:
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    resp = client.post(
        COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": max_context}
    )
    message = assert_openai_error(resp, 400, "max_tokens")
    # Both numbers, so that the client knows how much to cut.
    assert str(len(prompt)) in message and str(max_context) in message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"model": MODEL, "messages": [{"content": "hi"}]}, None),
        ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "temperature": -0.1}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": HELLO, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "stop": 5}, None),
        ({"model": MODEL}, "messages"),
    ],
)
def test_wrong_types_are_400_not_422(
    client: TestClient, body: dict[str, Any], param: str | None
) -> None:
    resp = client.post(CHAT, json=body)
    message = assert_openai_error(resp, 400)
    if param is not None:
        assert resp.json()["error"]["param"] == param
        assert param in message


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"a string"'])
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    for path in (CHAT, COMPLETIONS):
        resp = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert_openai_error(resp, 400)


def test_unsupported_options_are_400(client: TestClient) -> None:
    for n in (0, 129):  # parallel sampling: 1 to 128 choices
        assert_openai_error(client.post(CHAT, json={"model": MODEL, "messages": HELLO, "n": n}),
                            400, "n")
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": ["a", "b"]})
    assert "not supported yet" in assert_openai_error(resp, 400, "prompt")
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": [[1, 2], [3]]})
    assert "not supported yet" in assert_openai_error(resp, 400, "prompt")
    resp = client.post(CHAT, json={"model": MODEL, "messages": HELLO, "top_logprobs": 2})
    assert_openai_error(resp, 400, "top_logprobs")  # only with logprobs: true


def test_bad_token_ids_are_400(client: TestClient) -> None:
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": [1, 10_000_000]})
    assert_openai_error(resp, 400, "prompt")
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": [1, -5]})
    assert_openai_error(resp, 400)
    resp = client.post(COMPLETIONS, json={"model": MODEL, "prompt": []})
    assert_openai_error(resp, 400, "prompt")


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    # Gets past validation: fails only because no worker runs.
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "frobnicate": {"x": 1}}
    assert_openai_error(client.post(CHAT, json=body), 503)


def test_rejections_are_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kvrelay.gateway"):
        client.post(CHAT, json={"model": MODEL, "messages": []})
    lines = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1
    assert "400" in lines[0].getMessage()


def test_unknown_endpoint_is_openai_404(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing-here"), 404)


# --- no workers -------------------------------------------------------------------------


def test_health_is_503_without_workers(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["status"] == "unavailable"


def test_valid_request_without_workers_is_503(client: TestClient) -> None:
    resp = client.post(CHAT, json={"model": MODEL, "messages": HELLO, "max_tokens": 4})
    assert resp.json()["error"]["type"] == "service_unavailable_error"
    assert_openai_error(resp, 503)
    resp = client.post(COMPLETIONS, json={"prompt": "Once", "max_tokens": 1})
    assert_openai_error(resp, 503)


def test_stream_without_workers_ends_with_error_event(client: TestClient) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with client.stream("POST", CHAT, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "unavailable" in events[-2].lower()


def test_openai_sdk_sees_the_errors(client: TestClient) -> None:
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0
        )
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=MODEL, prompt="x", extra_body={"top_p": 7})


# --- API key ----------------------------------------------------------------------------


def test_api_key(default_model_dir: Path) -> None:
    with TestClient(create_app(_config(default_model_dir, api_key="sekret"))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            resp = c.get("/v1/models", headers=headers)
            assert_openai_error(resp, 401)
            assert resp.json()["error"]["type"] == "authentication_error"
            resp = c.post(CHAT, json={"messages": HELLO}, headers=headers)
            assert_openai_error(resp, 401)
        # Auth comes before body parsing: garbage without a key is still a 401.
        assert_openai_error(c.post(CHAT, content=b"{oops"), 401)
        good = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        bad_model = c.post(CHAT, json={"model": "nope", "messages": HELLO}, headers=good)
        assert_openai_error(bad_model, 404)
        # Load balancers probe /health without credentials.
        assert c.get("/health").status_code == 503


# --- sampling parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"presence_penalty": "lots"}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.2}, "repetition_penalty"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"5": "x"}}, "logit_bias"),
        ({"logit_bias": [5, 1]}, "logit_bias"),
        ({"logit_bias": {"10000000": 5}}, "logit_bias"),  # outside the vocabulary
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_out_of_range_sampling_parameters_are_400(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    for path, body in (
        (CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 4}),
        (COMPLETIONS, {"model": MODEL, "prompt": "Once", "max_tokens": 4}),
    ):
        resp = client.post(path, json={**body, **fields})
        message = assert_openai_error(resp, 400)
        # pydantic names the bad entry too (logit_bias.5); the field comes first.
        assert resp.json()["error"]["param"].split(".")[0] == param, message
        assert param in message or "vocabulary" in message


def test_min_tokens_beyond_the_context_is_400(client: TestClient, max_context: int) -> None:
    # No max_tokens: the answer may fill the context, and min_tokens may not ask for more.
    body = {"model": MODEL, "prompt": [1, 2, 3], "min_tokens": max_context}
    assert_openai_error(client.post(COMPLETIONS, json=body), 400, "min_tokens")


@pytest.mark.parametrize(
    "fields",
    [
        {"frequency_penalty": -2, "presence_penalty": 2},
        {"frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.3},
        {"min_p": 0, "top_k": -1},
        {"min_p": 1, "top_k": 1},
        {"top_k": 10_000_000},  # more than the vocabulary: all of it
        {"logit_bias": {"5": 100, "7": -100, "49151": 0.5}},
        {"logit_bias": {}},
        {"min_tokens": 4, "max_tokens": 4},
        {"min_tokens": 0, "seed": -5},
        {"seed": 2**70, "temperature": 0.7, "top_p": 0.9},
    ],
)
def test_sampling_parameters_in_range_get_past_validation(
    client: TestClient, fields: dict[str, Any]
) -> None:
    # Valid: what stops them is that no worker runs.
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}
    assert_openai_error(client.post(CHAT, json=body), 503)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, **fields}
    assert_openai_error(client.post(COMPLETIONS, json=body), 503)


def test_openai_sdk_sampling_parameters_are_accepted(client: TestClient) -> None:
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client,
                        max_retries=0)
    with pytest.raises(openai.InternalServerError) as unavailable:
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            temperature=0.8, top_p=0.9, seed=7, frequency_penalty=0.5, presence_penalty=0.3,
            logit_bias={"42": 10},
            extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2},
        )
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=MODEL, prompt="x", max_tokens=4, logit_bias={"42": 150})


def test_plan_puts_every_sampling_parameter_on_the_wire(default_model_dir: Path) -> None:
    model = load_model_info(str(default_model_dir))
    request = CompletionRequest.model_validate({
        "prompt": "Once", "temperature": 0.5, "top_p": 0.75, "seed": -1,
        "frequency_penalty": 0.25, "presence_penalty": -1.5, "logit_bias": {"9": -100, "3": 2.5},
        "top_k": 40, "min_p": 0.125, "repetition_penalty": 1.25, "min_tokens": 3,
        "stop_token_ids": [7],
    })
    plan = build_plan(model, request, [1, 2, 3], request_id="r", max_tokens=8)
    wire = plan.sampling_params()
    assert (wire.temperature, wire.top_p, wire.top_k, wire.seed) == (0.5, 0.75, 40, 2**64 - 1)
    assert (wire.frequency_penalty, wire.presence_penalty) == (0.25, -1.5)
    assert (wire.min_p, wire.repetition_penalty) == (0.125, 1.25)
    assert (wire.max_new_tokens, wire.min_new_tokens) == (8, 3)
    assert dict(wire.logit_bias) == {9: -100.0, 3: 2.5}
    assert list(wire.stop_token_ids) == [*model.eos_token_ids, 7]
    # What the workers make of it: every value is one SamplingParams accepts.
    params = sampling_from_pb(wire)
    assert params.logit_bias == ((3, 2.5), (9, -100.0))
    assert params.min_new_tokens == 3 and params.repetition_penalty == 1.25

    defaults = build_plan(model, CompletionRequest.model_validate({"prompt": "Once"}), [1, 2],
                          request_id="r", max_tokens=4).sampling_params()
    assert sampling_from_pb(defaults) == SamplingParams(
        max_new_tokens=4, stop_token_ids=tuple(model.eos_token_ids)
    )
