"""One streamed request, timed: the meter of the load tester.

Any OpenAI-compatible server: chat (`/v1/chat/completions`) or text completions
(`/v1/completions`), SSE streaming with `stream_options.include_usage` so the server's own
token counts come back when it supports them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

Endpoint = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ERROR_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True          # answers as long as asked (vLLM/SGLang extension)
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + PATHS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, prompt: str | list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        body["messages" if self.endpoint == "chat" else "prompt"] = prompt
        return {**body, **self.extra_body}


@dataclass
class StreamResult:
    ok: bool = False
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    started_at: float = 0.0          # perf_counter() when the request went out
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    text: str = ""
    content_chunks: int = 0
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None

    def fail(self, error_type: str, message: str) -> StreamResult:
        self.ok = False
        self.error_type = error_type
        self.error_message = message[:ERROR_MESSAGE_CHARS]
        return self


def chunk_text(data: dict[str, Any], endpoint: Endpoint) -> str:
    """The generated text a chunk carries ("" for role-only, finish and usage chunks)."""
    choices = data.get("choices") or []
    if not choices:
        return ""
    if endpoint == "completions":
        return str(choices[0].get("text") or "")
    delta = choices[0].get("delta") or {}
    # Reasoning models stream their thinking first: those are generated tokens too.
    return str(delta.get("content") or "") + str(delta.get("reasoning_content") or "")


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


async def _read_stream(response: httpx.Response, endpoint: Endpoint, started: float,
                       result: StreamResult) -> StreamResult:
    last = started
    done_at: float | None = None
    async for line in response.aiter_lines():
        if done_at is not None or not line.startswith("data:"):
            # After [DONE], read to the end: a fully read response keeps its connection
            # alive for the next request (a new one per request would add to every TTFT).
            continue  # also blank separators, ": keep-alive" comments, event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            done_at = time.perf_counter()
            continue
        now = time.perf_counter()
        data = json.loads(payload)
        if isinstance(data, dict) and data.get("error"):
            error = data["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else error
            return result.fail("stream_error", str(message))
        usage = data.get("usage")
        if usage:
            result.usage_prompt_tokens = usage.get("prompt_tokens")
            result.usage_completion_tokens = usage.get("completion_tokens")
        text = chunk_text(data, endpoint)
        if not text:
            continue
        if result.ttft_ms is None:
            result.ttft_ms = (now - started) * 1e3
        else:
            result.itl_ms.append((now - last) * 1e3)
        last = now
        result.content_chunks += 1
        result.text += text
    result.e2e_ms = ((done_at or time.perf_counter()) - started) * 1e3
    if done_at is None:
        return result.fail("incomplete_stream", "the stream ended without [DONE]")
    if result.ttft_ms is None:
        return result.fail("empty_output", "no chunk carried any text")
    result.ok = True
    return result


async def stream_request(client: httpx.AsyncClient, config: EndpointConfig,
                         prompt: str | list[dict[str, str]], max_tokens: int) -> StreamResult:
    """Send one request and time its chunks; never raises for a server's failure."""
    result = StreamResult()
    body = json.dumps(config.payload(prompt, max_tokens)).encode()
    headers = {"Content-Type": "application/json", **config.headers()}
    started = result.started_at = time.perf_counter()
    try:
        async with client.stream("POST", config.url, content=body, headers=headers,
                                 timeout=config.request_timeout_s) as response:
            result.http_status = response.status_code
            if response.status_code != 200:
                message = _error_message(await response.aread())
                return result.fail(f"http_{response.status_code}", message)
            return await _read_stream(response, config.endpoint, started, result)
    except httpx.TimeoutException as exc:
        return result.fail("timeout", f"{type(exc).__name__}: {exc}")
    except httpx.ConnectError as exc:
        return result.fail("connect_error", str(exc))
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return result.fail("connection_lost", f"{type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        return result.fail("http_error", f"{type(exc).__name__}: {exc}")
    except (json.JSONDecodeError, AttributeError) as exc:
        return result.fail("bad_chunk", f"{type(exc).__name__}: {exc}")
    finally:
        if result.e2e_ms is None and result.error_type not in (None, "cancelled"):
            result.e2e_ms = (time.perf_counter() - started) * 1e3


async def fetch_model_id(base_url: str, api_key: str | None, timeout_s: float = 10.0) -> str:
    """The first model the server lists (what SGLang's and vLLM's tools do without --model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


def cancelled_result() -> StreamResult:
    return StreamResult().fail("cancelled", "still running when the point's time was up")

