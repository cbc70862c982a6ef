"""LoRA adapters in our forward against PEFT: each adapter's answer is its merged model's.

Adapters are real PEFT checkpoints (LoraConfig + get_peft_model + save_pretrained) on a
tiny random Llama, with random A and B large enough to move the logits far. The oracle for
an adapter is transformers with PeftModel.merge_and_unload(): the weights W + s * B @ A.
Our runner applies the adapters unmerged, several of them per batch, per token row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from shared.block_hash import block_hashes
from shared.model.lora import LoraAdapter, LoraError, parse_lora_paths
from shared.model.lora_registry import LoraAdapterExists
from shared.model.runner import ModelRunner, SeqSlice
from tests.tiny_models import build_tiny_model

ATOL = 1e-4
VOCAB = 512
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora(
    model_dir: Path, out_dir: Path, *, seed: int, std: float = 0.1, **config: Any
) -> Path:
    """A PEFT adapter of the model in model_dir, with random A and B (not PEFT's zero B)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ALL_MODULES}
    peft_model = get_peft_model(model, LoraConfig(**{**settings, **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@torch.inference_mode()
def hf_logits(model_dir: Path, adapter_dir: Path | None, ids: list[int]) -> torch.Tensor:
    """Logits of every position: the base model, or the adapter merged into it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    return model(torch.tensor([ids])).logits[0].float()


def prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=generator).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        "llama",
        tmp_path_factory.mktemp("lora-base"),
        num_layers=2,
        vocab_size=VOCAB,
        with_tokenizer=False,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # Every module, rank 4.
        "a": build_lora(model_dir, root / "a", seed=1),
        # Another rank, some modules, rslora, a per-module alpha: pads and scales differ.
        "b": build_lora(
            model_dir,
            root / "b",
            seed=2,
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            alpha_pattern={"v_proj": 4},
        ),
        # Rank 2 on the attention alone, one layer only.
        "c": build_lora(
            model_dir,
            root / "c",
            seed=3,
            r=2,
            target_modules=["k_proj", "o_proj"],
            layers_to_transform=[1],
        ),
    }


@pytest.fixture
def runner(model_dir: Path, adapters: dict[str, Path]) -> Iterator[ModelRunner]:
    runner = ModelRunner(model_dir, kv_cache_mb=8, page_size=8)
    registry = runner.enable_lora(max_loras_per_batch=2)
    for name in ("a", "b", "c"):
        registry.load(name, str(adapters[name]))
    yield runner


def run_prompts(
    runner: ModelRunner, prompts: list[list[int]], loras: list[str | None], chunk: int = 0
) -> list[torch.Tensor]:
    """Each prompt's logits at every position, computed in one batch per chunk of tokens
    (all of a prompt at once when chunk is 0), then one token at a time (decode steps)."""
    registry = runner.lora
    assert registry is not None
    adapters = [None if name is None else registry.get(name) for name in loras]
    pool = runner.pool
    pages = [pool.allocate(pool.pages_for(len(p))) for p in prompts]
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    try:
        split = chunk or max(len(p) for p in prompts)
        # Prefill: the first `split` tokens of all prompts together (different lengths).
        slices = [
            SeqSlice(p[:split], 0, pg, a) for p, pg, a in zip(prompts, pages, adapters, strict=True)
        ]
        logits = runner.forward(slices)
        for i, row in enumerate(logits):
            out[i].append(row)
        # Decode: the rest, one token per sequence per step, all sequences in each step.
        position = split
        while any(position < len(p) for p in prompts):
            live = [i for i, p in enumerate(prompts) if position < len(p)]
            step = [SeqSlice([prompts[i][position]], position, pages[i], adapters[i]) for i in live]
            for i, row in zip(live, runner.forward(step), strict=True):
                out[i].append(row)
            position += 1
    finally:
        for page_list in pages:
            pool.free(page_list)
    return [torch.stack(rows) for rows in out]


def test_adapter_logits_equal_the_peft_merged_model(
    runner: ModelRunner, model_dir: Path, adapters: dict[str, Path]
) -> None:
    ids = prompt(0, 23)
    (ours,) = run_prompts(runner, [ids], ["a"], chunk=17)
    ref = hf_logits(model_dir, adapters["a"], ids)[16:]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()
    # The adapter matters: the base model's logits are far from these.
    base = hf_logits(model_dir, None, ids)[16:]
    assert (base - ref).abs().max() > 0.5


def test_batch_mixing_base_and_two_adapters_gives_each_its_own_answer(
    runner: ModelRunner, model_dir: Path, adapters: dict[str, Path]
) -> None:
    prompts = [prompt(1, 20), prompt(2, 27), prompt(3, 14), prompt(1, 20)]
    loras: list[str | None] = [None, "a", "b", "b"]
    ours = run_prompts(runner, prompts, loras, chunk=9)
    for ids, name, got in zip(prompts, loras, ours, strict=True):
        ref = hf_logits(model_dir, None if name is None else adapters[name], ids)[8:]
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"adapter {name}")
    # Same prompt, base and adapter b in the same batch: different answers.
    assert (ours[0] - ours[3]).abs().max() > 0.5


def test_adapters_beyond_the_slots_take_turns(
    runner: ModelRunner, model_dir: Path, adapters: dict[str, Path]
) -> None:
    registry = runner.lora
    assert registry is not None
    ids = prompt(4, 12)
    refs = {name: hf_logits(model_dir, adapters[name], ids)[-1] for name in "abc"}
    # Two slots, three adapters: each batch evicts the least recently used one.
    for names in (["a", "b"], ["c", "a"], ["b", "c"], ["a", "a"]):
        got = run_prompts(runner, [ids, ids], list(names))
        for name, logits in zip(names, got, strict=True):
            torch.testing.assert_close(logits[-1], refs[name], atol=ATOL, rtol=0)
    assert registry.slots.installs >= 5
    with pytest.raises(ValueError, match="max-loras-per-batch"):
        run_prompts(runner, [ids, ids, ids], ["a", "b", "c"])


def test_a_larger_rank_loaded_later_grows_the_slots(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    runner = ModelRunner(model_dir, kv_cache_mb=8, page_size=8)
    registry = runner.enable_lora(max_loras_per_batch=2)
    registry.load("c", str(adapters["c"]))  # rank 2
    ids = prompt(5, 10)
    run_prompts(runner, [ids], ["c"])
    assert registry.slots.rank == 2
    big = build_lora(model_dir, tmp_path / "big", seed=9, r=16)
    registry.load("big", str(big))
    got = run_prompts(runner, [ids, ids], ["c", "big"])
    assert registry.slots.rank == 16
    torch.testing.assert_close(
        got[0], hf_logits(model_dir, adapters["c"], ids)[-1:], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(got[1], hf_logits(model_dir, big, ids)[-1:], atol=ATOL, rtol=0)


def test_unloaded_adapter_keeps_serving_requests_that_hold_it(
    runner: ModelRunner, model_dir: Path, adapters: dict[str, Path]
) -> None:
    registry = runner.lora
    assert registry is not None
    held = registry.get("a")
    registry.unload("a")
    with pytest.raises(KeyError):
        registry.get("a")
    ids = prompt(6, 9)
    pages = runner.pool.allocate(runner.pool.pages_for(len(ids)))
    logits = runner.forward([SeqSlice(ids, 0, pages, held)])
    runner.pool.free(pages)
    torch.testing.assert_close(
        logits[0], hf_logits(model_dir, adapters["a"], ids)[-1], atol=ATOL, rtol=0
    )
    # Loaded again from the same files: the same key (its cached prefixes still apply).
    assert registry.load("a", str(adapters["a"])).key == held.key


def test_names_and_keys(runner: ModelRunner, adapters: dict[str, Path]) -> None:
    registry = runner.lora
    assert registry is not None
    a, b = registry.get("a"), registry.get("b")
    assert a.key != b.key and len(a.key) == 32
    assert registry.load("a", str(adapters["a"])) is a  # the same files again: a no-op
    with pytest.raises(LoraAdapterExists):
        registry.load("a", str(adapters["b"]))
    for bad in ("", "x:y", " a", "a" * 300):
        with pytest.raises(LoraError, match="invalid LoRA adapter name"):
            registry.load(bad, str(adapters["a"]))
    assert parse_lora_paths(["x=/p/one", "/p/two/", " "]) == [("x", "/p/one"), ("two", "/p/two/")]
    # The adapter's key enters the block hashes: no cached block is shared across adapters.
    ids = prompt(7, 32)
    hashes = {key: block_hashes(ids, 16, model="m", lora=key) for key in (None, a.key, b.key)}
    assert len({h[0] for h in hashes.values()}) == 3


def _edit_config(adapter: Path, out: Path, **changes: Any) -> Path:
    out.mkdir()
    for file in adapter.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type"),
    ],
)
def test_unsupported_adapter_features_are_refused(
    model_dir: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    changes: dict[str, Any],
    message: str,
) -> None:
    adapter = _edit_config(adapters["a"], tmp_path / "edited", **changes)
    with pytest.raises(LoraError, match=message):
        LoraAdapter.load("x", adapter, _config(model_dir), torch.float32)


def test_adapters_of_another_model_or_module_are_refused(model_dir: Path, tmp_path: Path) -> None:
    config = _config(model_dir)
    other = build_tiny_model(
        "llama", tmp_path / "wide", hidden_size=32, vocab_size=VOCAB, with_tokenizer=False
    )
    with pytest.raises(LoraError, match="do not fit"):
        LoraAdapter.load(
            "x", build_lora(other, tmp_path / "wide-lora", seed=1), config, torch.float32
        )
    with pytest.raises(LoraError, match="not supported"):
        LoraAdapter.load(
            "x",
            build_lora(model_dir, tmp_path / "head", seed=1, target_modules=["lm_head"]),
            config,
            torch.float32,
        )
    with pytest.raises(LoraError, match="not a directory"):
        LoraAdapter.load("x", tmp_path / "missing", config, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match=r"adapter_config\.json"):
        LoraAdapter.load("x", tmp_path / "empty", config, torch.float32)


def _config(model_dir: Path) -> Any:
    from shared.model.config import ModelConfig

    return ModelConfig.from_dir(model_dir)
