"""An OpenAI-compatible streaming server whose timing the prompt scripts: the meter's fixture.

    python -m tests.scripted_openai_server --port P

Words of the prompt (the last user message, or the completions prompt) set the script:
`ttft_ms=120` first content chunk after 120 ms; `itl_ms=20,35,10` the gaps to the next
chunks (one token each); `role_ms=5` a role-only chat chunk first (chat only);
`status=503` an HTTP error instead; `break_after=2` drop the connection after two tokens;
`error_after=2` an in-band error event after two tokens. Times count from the moment the
request's headers were read, against absolute deadlines (no drift).

One thread per request and `time.sleep` (clock_nanosleep): every stream keeps its own
schedule to ~0.1 ms, which a single event loop shared by many streams cannot promise.

GET /timings: for every request whose prompt says `id=NAME`, when each content chunk was
actually written (ms from arrival): the truth to hold the meter against when a busy
machine made the fixture itself late.

/metrics exports kvrelay-style counters that grow by known amounts per request: 3 hit
and 4 looked-up prefix tokens, 1024 transfer bytes; and the KV usage gauge in_flight/8.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HIT_TOKENS_PER_REQUEST = 3
QUERY_TOKENS_PER_REQUEST = 4
TRANSFER_BYTES_PER_REQUEST = 1024
KV_SLOTS = 8


@dataclass
class Script:
    ttft_ms: float = 20.0
    itl_ms: list[float] = field(default_factory=lambda: [10.0, 10.0, 10.0])
    role_ms: float | None = None
    status: int = 200
    break_after: int | None = None
    error_after: int | None = None

    @property
    def num_tokens(self) -> int:
        return 1 + len(self.itl_ms)


def parse_script(prompt: str) -> Script:
    script = Script()
    for key, value in re.findall(r"\b(ttft_ms|itl_ms|role_ms|status|break_after|error_after)"
                                 r"=([0-9.,]+)", prompt):
        value = value.rstrip(",.")
        if key == "itl_ms":
            script.itl_ms = [float(v) for v in value.split(",") if v]
        elif key in ("ttft_ms", "role_ms"):
            setattr(script, key, float(value))
        else:
            setattr(script, key, int(value))
    return script


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.sent_ms: dict[str, list[float]] = {}  # id -> content chunk write times

    def metrics_text(self) -> str:
        with self.lock:
            n, in_flight = self.requests, self.in_flight
        return "\n".join([
            "# TYPE kvrelay_prefix_cache_hit_tokens_total counter",
            f"kvrelay_prefix_cache_hit_tokens_total {n * HIT_TOKENS_PER_REQUEST}",
            "# TYPE kvrelay_prefix_cache_query_tokens_total counter",
            f"kvrelay_prefix_cache_query_tokens_total {n * QUERY_TOKENS_PER_REQUEST}",
            "# TYPE kvrelay_kv_transfer_bytes_total counter",
            f"kvrelay_kv_transfer_bytes_total {n * TRANSFER_BYTES_PER_REQUEST}",
            "# TYPE kvrelay_kv_cache_usage_ratio gauge",
            f"kvrelay_kv_cache_usage_ratio {in_flight / KV_SLOTS}",
        ]) + "\n"


COUNTERS = Counters()


def _chunk(chat: bool, text: str | None, finish: str | None = None, role: bool = False) -> bytes:
    body: dict[str, Any]
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        body = {"id": "s", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    else:
        body = {"id": "s", "object": "text_completion",
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}
    return _event(body)


def _event(body: dict[str, Any] | str) -> bytes:
    data = body if isinstance(body, str) else json.dumps(body)
    return f"data: {data}\n\n".encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streams

    def parse_request(self) -> bool:
        # The request line has just been read: the script's clock starts here, before
        # header parsing, which a busy machine can stretch by milliseconds.
        self.arrived = time.perf_counter()
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read the records, not the access log

    def _send_json(self, status: int, body: dict[str, Any] | str,
                   content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_json(200, {})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "scripted"}]})
        elif self.path == "/timings":
            with COUNTERS.lock:
                self._send_json(200, dict(COUNTERS.sent_ms))
        elif self.path == "/metrics":
            self._send_json(200, COUNTERS.metrics_text(), "text/plain; version=0.0.4")
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        arrived = self.arrived
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._send_json(404, {"error": {"message": "not found"}})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        prompt = str(body["messages"][-1]["content"] if chat else body["prompt"])
        script = parse_script(prompt)
        with COUNTERS.lock:
            COUNTERS.requests += 1
        if script.status != 200:
            self._send_json(script.status, {"error": {"message": "scripted failure",
                                                      "type": "server_error"}})
            return
        with COUNTERS.lock:
            COUNTERS.in_flight += 1
        request_id = re.search(r"\bid=(\S+)", prompt)
        sent: list[float] = []
        try:
            self._stream(script, chat, arrived, len(prompt.split()), sent)
        finally:
            with COUNTERS.lock:
                COUNTERS.in_flight -= 1
                if request_id:
                    COUNTERS.sent_ms[request_id.group(1)] = sent

    def _write(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, script: Script, chat: bool, arrived: float, prompt_tokens: int,
                sent: list[float]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if chat and script.role_ms is not None:
            _sleep_until(arrived + script.role_ms / 1e3)
            self._write(_chunk(chat, None, role=True))
        due = arrived + script.ttft_ms / 1e3
        for index in range(script.num_tokens):
            if index == script.break_after:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no terminating chunk
                return
            if index == script.error_after:
                self._write(_event({"error": {"message": "scripted stream error"}}))
                self._write(_event("[DONE]"))
                self._write(b"")
                return
            _sleep_until(due)
            self._write(_chunk(chat, f" tok{index}"))
            sent.append((time.perf_counter() - arrived) * 1e3)
            if index < len(script.itl_ms):
                due += script.itl_ms[index] / 1e3
        self._write(_chunk(chat, None if chat else "", finish="length"))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": script.num_tokens,
                 "total_tokens": prompt_tokens + script.num_tokens}
        self._write(_event({"id": "s", "choices": [], "usage": usage}))
        self._write(_event("[DONE]"))
        self._write(b"")  # the terminating zero-length chunk


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        super().server_bind()
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayHandler(Handler):
    def setup(self) -> None:
        super().setup()
        # Every SSE event goes out at once: no Nagle batching of small writes.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    Server((args.host, args.port), NoDelayHandler).serve_forever()


if __name__ == "__main__":
    main()
