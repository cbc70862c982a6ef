"""A full relay on the GPU: prefill computes on CUDA, decode reads the KV from GPU memory
to GPU memory over NIXL (VRAM), and continues the greedy answer as one GPU process does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.model.runner import ModelRunner, SeqSlice
from tests.tiny_models import build_tiny_model

pytest.importorskip("nixl._api")  # NIXL with CUDA support: nixl-cu12 or nixl-cu13

pytestmark = pytest.mark.gpu

PROMPT_TOKENS = 100
ANSWER_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def loopback_ucx() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UCX_NET_DEVICES", "lo")
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        "llama",
        tmp_path_factory.mktemp("gpu-model"),
        seed=3,
        with_tokenizer=False,
        num_layers=4,
        hidden_size=256,
        num_heads=8,
        num_kv_heads=2,
    )


def greedy_steps(runner: ModelRunner, first: int, start: int, pages: list[int]) -> list[int]:
    tokens = [first]
    for step in range(ANSWER_TOKENS - 1):
        logits = runner.forward([SeqSlice([tokens[-1]], start + step, pages)])
        tokens.append(int(logits[0].argmax()))
    return tokens


def test_greedy_answer_through_a_gpu_nixl_relay_equals_one_gpu_process(model_dir: Path) -> None:
    from shared.transfer.nixl_transport import NixlKvReceiver, NixlKvSender

    prompt = torch.randint(3, 49152, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(5))
    prompt_ids = prompt.tolist()
    kwargs = {"dtype": torch.bfloat16, "kv_cache_mb": 64, "device": "cuda"}
    prefill, decode = ModelRunner(model_dir, **kwargs), ModelRunner(model_dir, **kwargs)
    assert prefill.pool.kv.is_cuda and decode.pool.kv.is_cuda
    total = PROMPT_TOKENS + ANSWER_TOKENS
    src = prefill.pool.allocate(prefill.pool.pages_for(total))
    dst = decode.pool.allocate(decode.pool.pages_for(total))
    prompt_pages = decode.pool.pages_for(PROMPT_TOKENS)

    # The reference: the same steps in one process, on the prefill runner's own pages.
    logits = prefill.forward([SeqSlice(prompt_ids, 0, src)])
    first = int(logits[0].argmax())
    prompt_kv = prefill.pool.kv[:, :, src[:prompt_pages]].clone()

    sender = NixlKvSender(prefill.pool, "gpu-prefill")
    receiver = NixlKvReceiver(decode.pool, "127.0.0.1", 0, "127.0.0.1")
    try:
        request_id = uuid.uuid4().hex
        arrival = receiver.expect(request_id, dst[:prompt_pages])
        _, chunks = sender.send_pages(
            request_id=request_id,
            endpoint=receiver.endpoint,
            pool=prefill.pool,
            src_page_ids=src[:prompt_pages],
            dst_page_ids=dst[:prompt_pages],
        )
        sender.send_done(
            request_id=request_id,
            endpoint=receiver.endpoint,
            num_tokens=PROMPT_TOKENS,
            num_chunks=chunks,
            first_token_ids=[first],
            first_token_logprobs=[0.0],
        )
        assert arrival.result(timeout=60).first_token_ids == [first]
    finally:
        receiver.close()
        sender.close()
    assert torch.equal(decode.pool.kv[:, :, dst[:prompt_pages]], prompt_kv)

    expected = greedy_steps(prefill, first, PROMPT_TOKENS, src)
    assert greedy_steps(decode, first, PROMPT_TOKENS, dst) == expected
