"""`kvrelay up` starts the whole cluster (with a private Redis) and stops all of it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import psutil
import pytest
import redis

from services.processes import ChildProcess, free_port, http_healthy

pytestmark = pytest.mark.default_model


def test_up_serves_and_sigterm_stops_every_child(default_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    up = ChildProcess.kvrelay(
        "kvrelay up",
        ["up", "--port", str(port), "--model-path", str(default_model_dir),
         "--served-model-name", "smol", "--kv-cache-mb", "64", "--num-threads", "1"],
        log_path=tmp_path / "up.log",
    ).start()
    try:
        up.wait_ready(lambda: http_healthy(f"http://127.0.0.1:{port}/health"), timeout_s=240)
        children = psutil.Process(up.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert sum(" prefill " in c for c in commands) == 1, commands
        assert sum(" decode " in c for c in commands) == 1, commands
        assert sum(" gateway " in c for c in commands) == 1, commands
        redis_children = [c for c in children if "redis-server" in c.name()]
        assert len(redis_children) == 1
        redis_port = next(
            conn.laddr.port for conn in redis_children[0].net_connections()
            if conn.status == psutil.CONN_LISTEN
        )
        assert redis.Redis(port=redis_port).ping()

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY",
                               max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smol"]
        reply = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Say hello."}],
            temperature=0, max_tokens=8,
        )
        assert reply.choices[0].message.content

        os.kill(up.pid, signal.SIGTERM)
        assert up.process is not None
        assert up.process.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        up.stop()


def test_sigterm_while_starting_leaves_no_child(default_model_dir: Path, tmp_path: Path) -> None:
    up = ChildProcess.kvrelay(
        "kvrelay up",
        ["up", "--port", str(free_port()), "--model-path", str(default_model_dir),
         "--kv-cache-mb", "64", "--num-threads", "1"],
        log_path=tmp_path / "up.log",
    ).start()
    try:
        parent = psutil.Process(up.pid)
        deadline = time.monotonic() + 60
        while not any(" decode " in " ".join(c.cmdline()) for c in parent.children()):
            assert time.monotonic() < deadline, "kvrelay up started no decode worker"
            time.sleep(0.05)
        children = parent.children(recursive=True)
        os.kill(up.pid, signal.SIGTERM)
        assert up.process is not None
        assert up.process.wait(timeout=30) != 0  # it never came up
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        up.stop()
