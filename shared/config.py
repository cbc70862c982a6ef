"""Configuration of the worker services, shared by the CLI, the launcher and the workers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class WorkerConfig:
    """One prefill or decode worker. Every field has a flag and a KVRELAY_* variable."""

    role: str  # "prefill" or "decode"
    model_path: str | None = None  # None: the default model
    host: str = "127.0.0.1"  # gRPC bind address
    port: int = 0  # gRPC port (0: pick a free one)
    advertise_host: str | None = None  # address peers use to reach this worker
    worker_id: str = ""
    dtype: str = "float32"
    kv_cache_mb: int = 512
    block_size: int = 16
    kv_transport: str = "zmq"
    kv_port: int = 0  # decode: KV receive port (0: pick a free one)
    kv_timeout_s: float = 60.0  # decode: how long reserved pages wait for their KV
    max_queued_requests: int = 256  # requests waiting for compute or KV pages, at most
    queue_timeout_s: float = 30.0  # decode: longest wait for KV pages before a 503
    max_prefill_tokens: int = 4096  # prefill: tokens of all prompts in one step
    chunked_prefill_size: int = 2048  # prefill: longest piece of one prompt in one step
    colocated: bool = False  # decode: also prefill in this process (local KV)
    num_threads: int | None = None  # torch intra-op threads
    redis_url: str | None = None
    served_model_name: str | None = None
    metrics_port: int = 0  # /metrics over HTTP (0: not served)
    enable_lora: bool = False  # serve LoRA adapters (implied by lora_paths)
    lora_paths: list[str] = field(default_factory=list)  # "name=path" PEFT directories
    max_loras_per_batch: int = 8  # distinct adapters in one forward (device slots)
    max_lora_rank: int = 0  # largest adapter rank accepted (0: any)
    enable_return_routed_experts: bool = False  # MoE: requests may ask for their experts
    # gRPC callers must send it; derives the KV channel's CURVE keys. repr=False: never logged.
    internal_token: str | None = field(default=None, repr=False)
    drain_timeout_s: float = 8.0  # SIGTERM: longest wait for calls in flight to finish
    kv_send_timeout_s: float = 3.0  # prefill: longest wait for a decode worker to take KV
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def served_model_name(model_path: str | None, explicit_name: str | None = None) -> str:
    """The name clients put in `model`: the flag's value, else the model's folder or file."""
    if explicit_name:
        return explicit_name
    if model_path is None:
        return DEFAULT_MODEL_NAME
    name = model_path.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")
