"""Every supported architecture against transformers on tiny random checkpoints.

Each variant is served by our ModelRunner over the paged KV pool (scattered pages, batches
of prompts of different lengths) and must give HF's logits and greedy tokens. A knock-out
per variant switches its special feature off (sliding window, rope scaling, q/k norm,
biases, expert renormalisation) and checks the match breaks: the feature is exercised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from shared.model.decoder import DecoderModel
from shared.model.llama import LlamaModel
from shared.model.mistral import MistralModel
from shared.model.mlp import MoeMlp
from shared.model.qwen2 import Qwen2Model
from shared.model.qwen3 import Qwen3Model
from shared.model.qwen3_moe import Qwen3MoeModel
from shared.model.registry import load_model
from shared.model.rope import RopeScaling, rotary_tables
from shared.model.runner import ModelRunner, SeqSlice
from tests.tiny_models import build_tiny_model

ATOL = 1e-4
PAGE = 8
VOCAB = 49152


def _no_windows(model: DecoderModel) -> None:
    for layer in model.layers:
        layer.window = None


def _default_rope(model: DecoderModel) -> None:
    cfg = model.config
    model.cos, model.sin = rotary_tables(
        cfg.head_dim, cfg.rope_theta, RopeScaling(), cfg.max_context, model.dtype, model.device
    )


def _no_qk_norm(model: DecoderModel) -> None:
    for layer in model.layers:
        layer.qk_norm = None


def _no_biases(model: DecoderModel) -> None:
    for layer in model.layers:
        layer.qkv.bias = layer.o.bias = None


def _no_topk_renorm(model: DecoderModel) -> None:
    for layer in model.layers:
        if isinstance(layer.mlp, MoeMlp):
            layer.mlp.norm_topk_prob = False


@dataclass(frozen=True)
class Variant:
    family: str  # key of tests.tiny_models.FAMILIES
    model_cls: type[DecoderModel]
    knockout: Callable[[DecoderModel], None]
    build: dict[str, Any] = field(default_factory=dict)  # build_tiny_model arguments


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 100000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 100000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "llama3-rope": Variant(
        "llama",
        LlamaModel,
        _default_rope,
        {"seed": 11, "tie_word_embeddings": False, "rope_parameters": LLAMA3_ROPE},
    ),
    "llama-linear-rope-biases": Variant(
        "llama",
        LlamaModel,
        _no_biases,
        {
            "seed": 12,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    # Window 8, shorter than the prompts: it is enforced in prefill, chunks and decode.
    "mistral-window": Variant(
        "mistral",
        MistralModel,
        _no_windows,
        {"seed": 13, "tie_word_embeddings": False, "sliding_window": 8},
    ),
    # Qwen2.5's layout: tied, q/k/v biases, window on the layers from max_window_layers on.
    "qwen2-tied-sharded": Variant(
        "qwen2",
        Qwen2Model,
        _no_biases,
        {
            "seed": 14,
            "max_shard_size": "200KB",
            "use_sliding_window": True,
            "sliding_window": 12,
            "max_window_layers": 1,
        },
    ),
    "qwen2-window": Variant(
        "qwen2",
        Qwen2Model,
        _no_windows,
        {"seed": 15, "use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1},
    ),
    "qwen2-yarn": Variant(
        "qwen2", Qwen2Model, _default_rope, {"seed": 16, "rope_parameters": YARN_ROPE}
    ),
    # head_dim 32 with 4 heads of a 64-wide model: q is wider than the hidden state.
    "qwen3": Variant(
        "qwen3", Qwen3Model, _no_qk_norm, {"seed": 17, "tie_word_embeddings": False, "head_dim": 32}
    ),
    # Layer 1 keeps a dense MLP (mlp_only_layers); layers 0 and 2 route to 2 of 4 experts.
    "qwen3-moe": Variant(
        "qwen3_moe",
        Qwen3MoeModel,
        _no_topk_renorm,
        {"seed": 18, "tie_word_embeddings": False, "num_layers": 3, "mlp_only_layers": [1]},
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> Variant:
    return VARIANTS[request.param]


@pytest.fixture(scope="module")
def model_dir(variant: Variant, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(variant.family)
    return build_tiny_model(variant.family, out, with_tokenizer=False, **variant.build)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture()
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, kv_cache_mb=1, page_size=PAGE)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scattered_pages(runner: ModelRunner, num_tokens: int) -> list[int]:
    # Reversed so consecutive positions never sit in consecutive pages.
    return runner.pool.allocate(runner.pool.pages_for(num_tokens))[::-1]


@torch.inference_mode()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    """HF logits at every position of `ids`, [len(ids), vocab]."""
    return hf(torch.tensor([ids])).logits[0].float()


def batched_prefill(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    seqs = [SeqSlice(p, 0, scattered_pages(runner, len(p))) for p in prompts]
    return runner.forward(seqs)


def test_architecture_loads_as_its_family(variant: Variant, model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    model = load_model(model_dir, torch.float32)
    assert type(model) is variant.model_cls
    assert isinstance(model, DecoderModel)
    assert (model.lm_head.weight is model.embed) == cfg["tie_word_embeddings"]
    if "max_shard_size" in variant.build:
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1


def test_batched_varlen_prefill_matches_hf(runner: ModelRunner, hf_model: Any) -> None:
    prompts = [prompt(n, seed=n) for n in (37, 5, 22)]
    logits = batched_prefill(runner, prompts)
    expected = torch.stack([hf_logits(hf_model, p)[-1] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_chunks_and_batched_decode_match_hf(runner: ModelRunner, hf_model: Any) -> None:
    # Two sequences: a prefill in two chunks, then single-token steps taken together (the
    # batched decode path), then a mixed step (one token beside a chunk); teacher-forced so
    # every position is compared with HF.
    seqs = [prompt(30, seed=1), prompt(30, seed=2)]
    refs = [hf_logits(hf_model, s) for s in seqs]
    pages = [scattered_pages(runner, len(s)) for s in seqs]
    cut = 11
    runner.forward([SeqSlice(s[:cut], 0, p) for s, p in zip(seqs, pages, strict=True)])
    got = runner.forward([SeqSlice(s[cut:18], cut, p) for s, p in zip(seqs, pages, strict=True)])
    for i in range(2):
        torch.testing.assert_close(got[i], refs[i][17], atol=ATOL, rtol=0)
    for pos in range(18, 26):
        step = [SeqSlice([s[pos]], pos, p) for s, p in zip(seqs, pages, strict=True)]
        got = runner.forward(step)
        for i in range(2):
            torch.testing.assert_close(got[i], refs[i][pos], atol=ATOL, rtol=0)
    mixed = runner.forward(
        [SeqSlice(seqs[0][26:27], 26, pages[0]), SeqSlice(seqs[1][26:], 26, pages[1])]
    )
    torch.testing.assert_close(mixed[0], refs[0][26], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], refs[1][29], atol=ATOL, rtol=0)


def test_greedy_tokens_match_hf(runner: ModelRunner, hf_model: Any) -> None:
    max_new = 12
    prompts = [prompt(13, seed=3), prompt(21, seed=4)]
    eos = set(runner.config.eos_token_ids)
    pages = [scattered_pages(runner, len(p) + max_new) for p in prompts]
    first = runner.forward([SeqSlice(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)])
    answers = [[int(t)] for t in first.argmax(-1)]
    # Both answers step together until each ends at EOS or max_new.
    while live := [i for i, a in enumerate(answers) if len(a) < max_new and a[-1] not in eos]:
        steps = [
            SeqSlice([answers[i][-1]], len(prompts[i]) + len(answers[i]) - 1, pages[i])
            for i in live
        ]
        for i, token in zip(live, runner.forward(steps).argmax(-1).tolist(), strict=True):
            answers[i].append(int(token))
    for p, answer in zip(prompts, answers, strict=True):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
            )
        assert answer == ref[0, len(p) :].tolist()


def test_knocking_out_the_family_feature_breaks_the_match(
    variant: Variant, runner: ModelRunner, hf_model: Any
) -> None:
    """The variant's feature matters on these prompts: without it our logits leave HF's."""
    assert isinstance(runner.model, DecoderModel)
    variant.knockout(runner.model)
    prompts = [prompt(n, seed=n) for n in (37, 22)]
    logits = batched_prefill(runner, prompts)
    expected = torch.stack([hf_logits(hf_model, p)[-1] for p in prompts])
    assert (logits - expected).abs().max() > 100 * ATOL


def test_stacked_experts_checkpoint_loads_alike(tmp_path: Path) -> None:
    """transformers' in-memory expert layout (what a GGUF conversion saves) serves alike."""
    hub = build_tiny_model(
        "qwen3_moe", tmp_path / "hub", seed=5, with_tokenizer=False, tie_word_embeddings=False
    )
    hf = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(stacked / "model.safetensors"))
    (stacked / "config.json").write_text((hub / "config.json").read_text())
    ids = prompt(19, seed=6)
    outs = []
    for d in (hub, stacked):
        runner = ModelRunner(d, kv_cache_mb=1, page_size=PAGE)
        outs.append(runner.forward([SeqSlice(ids, 0, scattered_pages(runner, len(ids)))])[0])
    # Not bit-equal: one model loaded twice already differs in the last bits (buffer
    # alignment picks the GEMM kernel), so the check is a tolerance far below a wrong layout.
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0], hf_logits(hf.eval(), ids)[-1], atol=ATOL, rtol=0)


def _edit_config(src: Path, dst: Path, **changes: Any) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_unsupported_rope_type_is_refused(tmp_path: Path) -> None:
    src = build_tiny_model("llama", tmp_path / "m", with_tokenizer=False)
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    bad = _edit_config(src, tmp_path / "dynamic", rope_parameters=dynamic)
    with pytest.raises(NotImplementedError, match="dynamic"):
        load_model(bad, torch.float32)


def test_weights_of_another_family_are_refused(tmp_path: Path) -> None:
    # A Qwen3 checkpoint labelled Llama would silently drop its q/k norms.
    src = build_tiny_model("qwen3", tmp_path / "m", with_tokenizer=False)
    bad = _edit_config(src, tmp_path / "as-llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="q_norm"):
        load_model(bad, torch.float32)


def test_routed_experts_are_the_hf_routers_choices(tmp_path: Path) -> None:
    d = build_tiny_model(
        "qwen3_moe",
        tmp_path / "moe",
        seed=7,
        with_tokenizer=False,
        num_layers=3,
        mlp_only_layers=[1],
    )
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = ModelRunner(d, kv_cache_mb=1, page_size=PAGE)
    model = runner.model
    assert isinstance(model, DecoderModel)
    prompts = [prompt(13, seed=8), prompt(6, seed=9)]
    plain = batched_prefill(runner, prompts)
    assert model.routed_experts is None  # off unless asked for
    model.record_routing = True
    logits = batched_prefill(runner, prompts)
    torch.testing.assert_close(logits, plain, atol=ATOL, rtol=0)
    routed = model.routed_experts
    assert routed is not None and routed.shape == (13 + 6, 3, 2)
    rows = [routed[:13], routed[13:]]
    for p, ours in zip(prompts, rows, strict=True):
        with torch.inference_mode():
            out = hf(torch.tensor([p]), output_router_logits=True)
        sparse = [0, 2]  # layer 1 is dense (mlp_only_layers)
        assert len(out.router_logits) == len(sparse)
        for layer, router_logits in zip(sparse, out.router_logits, strict=True):
            expected = torch.topk(torch.softmax(router_logits.float(), dim=-1), 2).indices
            assert torch.equal(ours[:, layer].long(), expected)
        assert bool((ours[:, 1] == -1).all())
