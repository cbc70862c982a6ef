"""The API around the answers, against a real cluster through the official OpenAI SDK:
API key, body limit, models, /health_generate, greedy streams equal to whole answers,
and the OpenAPI description.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.gateway.tokenizer import load_model_info
from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-api"
KEY = "sk-kvrelay-test-4f1c9e"
BODY_LIMIT = 64 * 1024
ASK = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-api"))
    cluster = start_cluster(
        model_dir,
        tmp_path_factory.mktemp("api-cluster"),
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        gateway_args=["--api-key", KEY, "--max-request-body-bytes", str(BODY_LIMIT)],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 24}
    return client.chat.completions.create(**{**body, **fields})


def assert_error_shape(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# --- greedy: a stream put together is the whole answer -----------------------------------


def test_sync_stream_equals_whole_answer(client: openai.OpenAI) -> None:
    whole = chat(client)
    choice = whole.choices[0]
    assert choice.message.content and choice.finish_reason == "length"
    assert choice.message.tool_calls is None
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24


def test_async_stream_equals_whole_answer(cluster: Cluster, client: openai.OpenAI) -> None:
    expected = chat(client).choices[0].message.content

    async def run() -> tuple[str, str, str]:
        aclient = openai.AsyncOpenAI(
            base_url=f"{cluster.base_url}/v1", api_key=KEY, max_retries=0, timeout=60
        )
        body: dict[str, Any] = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 24}
        whole, stream, completion = await asyncio.gather(
            aclient.chat.completions.create(**body),
            aclient.chat.completions.create(**body, stream=True),
            aclient.completions.create(
                model=MODEL, prompt="Once upon", max_tokens=8, temperature=0, stream=True
            ),
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        completion_text = "".join([c.choices[0].text async for c in completion if c.choices])
        await aclient.close()
        return whole.choices[0].message.content or "", text, completion_text

    whole, streamed, completion_text = asyncio.run(run())
    assert whole == streamed == expected
    assert (
        completion_text
        == client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
        .choices[0]
        .text
    )


# --- models ---------------------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "kvrelay"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-99")
    error = assert_error_shape(missing.value.response.json())
    assert error["code"] == "model_not_found" and "gpt-99" in error["message"]


# --- API key --------------------------------------------------------------------------


def test_api_key_is_required_on_the_api(cluster: Cluster) -> None:
    for key in ("wrong", KEY.upper(), KEY + "x", KEY[:-1]):
        wrong = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            wrong.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
        error = assert_error_shape(denied.value.response.json())
        assert error["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1"):
        resp = httpx.post(f"{cluster.base_url}{path}", json={})
        assert resp.status_code == 401, path
        assert resp.headers["www-authenticate"] == "Bearer"
    # Load balancers and Prometheus come without a key.
    for path in ("/health", "/health_generate", "/metrics"):
        assert httpx.get(f"{cluster.base_url}{path}", timeout=30).status_code == 200, path


def test_api_key_is_never_logged(cluster: Cluster, client: openai.OpenAI) -> None:
    chat(client, max_tokens=2)
    wrong = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=KEY + "-guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    logs = "".join(p.log_path.read_text(errors="replace") for p in cluster.processes if p.log_path)
    assert "rejected" in logs  # the 401 is logged...
    assert KEY not in logs  # ...but neither the key nor the guess


# --- body limit and lengths ----------------------------------------------------------------


def test_oversized_body_is_413(cluster: Cluster, client: openai.OpenAI) -> None:
    huge = [{"role": "user", "content": "word " * BODY_LIMIT}]
    with pytest.raises(openai.APIStatusError) as too_large:
        chat(client, messages=huge)
    assert too_large.value.status_code == 413
    error = assert_error_shape(too_large.value.response.json())
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]

    # Chunked, without a Content-Length: counted as it comes.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-api", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    resp = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert resp.status_code == 413
    assert "content-length" not in resp.request.headers
    assert_error_shape(resp.json())
    # A key is checked first: without one, the answer is 401 whatever the size.
    resp = httpx.post(f"{cluster.base_url}/v1/chat/completions", content=b"x" * (BODY_LIMIT + 1))
    assert resp.status_code == 401


def test_prompt_beyond_the_context_is_400(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "lighthouse " * 3000}]  # under the body limit
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, messages=long)
    assert "context" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(client, max_tokens=2048)
    error = assert_error_shape(too_many.value.response.json())
    assert error["param"] == "max_tokens"


# --- OpenAPI --------------------------------------------------------------------------


def test_openapi_describes_what_is_accepted(cluster: Cluster) -> None:
    schema = httpx.get(f"{cluster.base_url}/openapi.json").json()
    chat_op = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(chat_op["responses"]) >= {"200", "400", "401", "413"}
    assert "422" not in str(schema)  # validation errors are 400s here
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in (
        "messages",
        "tools",
        "tool_choice",
        "chat_template_kwargs",
        "separate_reasoning",
        "max_tokens",
        "stream",
    ):
        assert field in request, field
    assert "ErrorResponse" in schema["components"]["schemas"]


# --- /health_generate (last: it stops the decode worker) -------------------------------


def test_health_generate(cluster: Cluster) -> None:
    resp = httpx.get(f"{cluster.base_url}/health_generate", timeout=30)
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok" and resp.json()["completion_tokens"] == 2

    next(p for p in cluster.processes if p.name.startswith("decode")).stop()
    resp = httpx.get(f"{cluster.base_url}/health_generate", timeout=60)
    assert resp.status_code == 503
    error = assert_error_shape(resp.json())
    assert error["type"] == "service_unavailable_error"


# --- --chat-template ------------------------------------------------------------------


def test_chat_template_flag_takes_a_file_or_inline_jinja(
    default_model_dir: Path, tmp_path: Path
) -> None:
    inline = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(inline)
    for spec in (inline, str(path)):
        model = load_model_info(str(default_model_dir), chat_template=spec)
        ids = model.render_chat([{"role": "user", "content": "hi"}])
        assert model.tokenizer.decode(ids) == "[user] hi\n"
    with pytest.raises(FileNotFoundError):
        load_model_info(str(default_model_dir), chat_template=str(tmp_path / "missing.jinja"))
