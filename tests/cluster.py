"""Starts real kvrelay services as separate processes for tests, and stops them by pid."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc

from services.processes import ChildProcess, free_port, grpc_serving, http_healthy
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc import kvrelay_pb2_grpc as pb_grpc


@dataclass
class Cluster:
    base_url: str
    model_name: str
    prefill_addrs: list[str]
    decode_addrs: list[str]
    log_dir: Path
    processes: list[ChildProcess] = field(default_factory=list)
    metrics_urls: dict[str, str] = field(default_factory=dict)  # worker name -> /metrics
    internal_token: str | None = None  # sent to the workers' gRPC when they require it

    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.internal_token is None:
            return ()
        return (("authorization", f"Bearer {self.internal_token}"),)

    def worker_info(self, address: str, role: str) -> pb.WorkerInfo:
        with grpc.insecure_channel(address) as channel:
            stub: pb_grpc.PrefillWorkerStub | pb_grpc.DecodeWorkerStub
            if role == "prefill":
                stub = pb_grpc.PrefillWorkerStub(channel)
            else:
                stub = pb_grpc.DecodeWorkerStub(channel)
            info: pb.WorkerInfo = stub.GetInfo(
                pb.WorkerInfoRequest(), timeout=5, metadata=self.grpc_metadata()
            )
            return info

    def process(self, name: str) -> ChildProcess:
        return next(p for p in self.processes if p.name == name)

    def worker_name(self, address: str) -> str:
        """'prefill-0', 'decode-1'... of the worker at this gRPC address."""
        if address in self.prefill_addrs:
            return f"prefill-{self.prefill_addrs.index(address)}"
        return f"decode-{self.decode_addrs.index(address)}"

    def address(self, name: str) -> str:
        role, index = name.rsplit("-", 1)
        return (self.prefill_addrs if role == "prefill" else self.decode_addrs)[int(index)]

    def restart(self, name: str, timeout_s: float = 180.0) -> ChildProcess:
        """Starts a stopped or killed worker again, same command and port; waits until it serves."""
        old = self.process(name)
        old.stop()
        new = ChildProcess(name, old.argv, old.env, old.log_path).start()
        self.processes[self.processes.index(old)] = new
        new.wait_ready(partial(grpc_serving, self.address(name)), timeout_s=timeout_s)
        return new

    def wait_all_pages_free(self, timeout_s: float = 10.0, *, skip_dead: bool = False) -> None:
        """Every worker's KV pool is back to idle; raises with the numbers if not.

        With `skip_dead`, workers whose process has exited are left out.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            alive = {a for a in self.prefill_addrs + self.decode_addrs
                     if not skip_dead or self.process(self.worker_name(a)).alive()}
            infos = [(a, self.worker_info(a, "prefill")) for a in self.prefill_addrs
                     if a in alive] + [
                (a, self.worker_info(a, "decode")) for a in self.decode_addrs if a in alive
            ]
            # Pages kept only by a prefix cache are idle: evictable on demand.
            busy = [
                (a, i.num_pages - i.free_pages - i.cached_pages)
                for a, i in infos
                if i.free_pages + i.cached_pages < i.num_pages
            ]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pages still held after {timeout_s} s: {busy}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.log_path.read_text(errors='replace')[-4000:]}"
            for p in self.processes
            if p.log_path is not None and p.log_path.exists()
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def start_cluster(
    model_dir: Path,
    log_dir: Path,
    *,
    model_name: str = "test-model",
    num_prefill: int = 1,
    num_decode: int = 1,
    kv_cache_mb: int = 128,
    worker_args: Sequence[str] = (),
    decode_args: Sequence[str] = (),
    gateway_args: Sequence[str] = (),
    colocated: bool = False,
    metrics: bool = False,
    prefill_args: Sequence[str] = (),
    internal_token: str | None = None,
) -> Cluster:
    """Separate prefill and decode processes, or with `colocated` one process for both.

    With `metrics`, each worker serves /metrics on a port of its own (Cluster.metrics_urls).
    With `internal_token`, every service gets it as KVRELAY_INTERNAL_TOKEN (never in argv).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    if colocated:
        num_prefill, num_decode, decode_args = 0, 1, [*decode_args, "--colocated"]
    gateway_port = free_port()
    cluster = Cluster(f"http://127.0.0.1:{gateway_port}", model_name, [], [], log_dir)
    cluster.internal_token = internal_token
    env = {"KVRELAY_INTERNAL_TOKEN": internal_token} if internal_token else None
    common = ["--model-path", str(model_dir), "--served-model-name", model_name,
              "--kv-cache-mb", str(kv_cache_mb), *worker_args]
    try:
        for role, count in (("prefill", num_prefill), ("decode", num_decode)):
            for index in range(count):
                port = free_port()
                extra = list(decode_args) if role == "decode" else list(prefill_args)
                if metrics:
                    metrics_port = free_port()
                    extra += ["--metrics-port", str(metrics_port)]
                    cluster.metrics_urls[f"{role}-{index}"] = (
                        f"http://127.0.0.1:{metrics_port}/metrics"
                    )
                process = ChildProcess.kvrelay(
                    f"{role}-{index}", [role, "--port", str(port), *common, *extra],
                    env=env, log_path=log_dir / f"{role}-{index}.log",
                ).start()
                cluster.processes.append(process)
                (cluster.prefill_addrs if role == "prefill" else cluster.decode_addrs).append(
                    f"127.0.0.1:{port}"
                )
        for process, address in zip(
            cluster.processes, cluster.prefill_addrs + cluster.decode_addrs, strict=True
        ):
            process.wait_ready(partial(grpc_serving, address), timeout_s=180)
        if colocated:
            cluster.prefill_addrs = list(cluster.decode_addrs)
        gateway = ChildProcess.kvrelay(
            "gateway",
            ["gateway", "--port", str(gateway_port), "--model-path", str(model_dir),
             "--served-model-name", model_name,
             "--prefill-addrs", ",".join(cluster.prefill_addrs),
             "--decode-addrs", ",".join(cluster.decode_addrs), *gateway_args],
            env=env, log_path=log_dir / "gateway.log",
        ).start()
        cluster.processes.append(gateway)
        gateway.wait_ready(lambda: http_healthy(f"{cluster.base_url}/health"), timeout_s=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster
