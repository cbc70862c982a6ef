"""What the fault tests share: worker metrics, waiting, prompts, and the fault record."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.fault_table import FaultRecord, append_record
from tests.cluster import Cluster

T = TypeVar("T")


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (those with `labels`) on a /metrics page; 0 if none."""
    text = httpx.get(url, timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(
    check: Callable[[], T], timeout_s: float, interval_s: float = 0.02, what: str = "condition"
) -> T:
    """Polls `check` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)


def long_prompt(num_words: int) -> str:
    """A prompt no earlier test sent (so no prefix cache covers it): about num_words tokens."""
    return f"{uuid.uuid4().hex} " + " ".join(f"w{i % 97}" for i in range(num_words))


def completion_body(
    cluster: Cluster, prompt: str, max_tokens: int, **extra: object
) -> dict[str, object]:
    return {
        "model": cluster.model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def small_request(cluster: Cluster, timeout_s: float = 60.0) -> httpx.Response:
    body = completion_body(cluster, f"hello {uuid.uuid4().hex}", 4)
    return httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=timeout_s)


def seconds_until_served(cluster: Cluster, since: float, timeout_s: float = 60.0) -> float:
    """Sends small requests until one succeeds; the time from `since` (time.monotonic())."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if small_request(cluster).status_code == 200:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no request succeeded within {timeout_s} s of the fault")
        time.sleep(0.1)


def leaked_pages(cluster: Cluster, timeout_s: float = 10.0) -> int:
    """KV pages still held on the live workers once they had `timeout_s` to go idle."""
    try:
        cluster.wait_all_pages_free(timeout_s=timeout_s, skip_dead=True)
        return 0
    except AssertionError:
        pass
    held = 0
    for role, addrs in (("prefill", cluster.prefill_addrs), ("decode", cluster.decode_addrs)):
        for addr in addrs:
            if cluster.process(cluster.worker_name(addr)).alive():
                info = cluster.worker_info(addr, role)
                held += info.num_pages - info.free_pages - info.cached_pages
    return held


def record(
    fault: str, client_saw: str, recover_s: float, pages_leaked: int, detail: str = ""
) -> None:
    """Prints the fault's row and appends it to the records of loadtest/fault_table.py."""
    row = FaultRecord(fault, client_saw, round(recover_s, 3), pages_leaked, detail)
    print(f"\nFAULT {row}")
    append_record(row)


def busy_worker(cluster: Cluster, role: str, timeout_s: float = 30.0) -> str:
    """The name of the `role` worker that holds a request now (by its running gauge)."""
    names = [n for n in cluster.metrics_urls if n.startswith(role)]

    def find() -> str | None:
        for name in names:
            if metric(cluster.metrics_urls[name], "kvrelay_worker_running_requests") > 0:
                return name
        return None

    name = wait_until(find, timeout_s, what=f"a busy {role} worker")
    assert name is not None
    return name


def gateway_sees_healthy(cluster: Cluster, name: str, timeout_s: float = 30.0) -> float:
    """Waits until the gateway's /health counts the worker healthy; returns the seconds."""
    started = time.monotonic()
    role = name.rsplit("-", 1)[0]
    address = cluster.address(name)

    def healthy() -> bool:
        try:
            report = httpx.get(f"{cluster.base_url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(report.get(role, {}).get(address))

    wait_until(healthy, timeout_s, interval_s=0.1, what=f"{name} healthy at the gateway")
    return time.monotonic() - started


def restart_and_serve(cluster: Cluster, name: str) -> None:
    """Restarts a killed worker; the gateway routes to it again, every pool is idle."""
    cluster.restart(name)
    gateway_sees_healthy(cluster, name)
    assert seconds_until_served(cluster, time.monotonic()) < 30
    assert leaked_pages(cluster) == 0
