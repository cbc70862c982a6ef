"""Block hashes: chained, 128-bit, stable everywhere, keyed by model, LoRA and cache_salt."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shared.block_hash import DIGEST_SIZE, block_hashes

MODEL = "SmolLM2-135M-Instruct"

# Known answers: a change here breaks every deployed cache and index, so it must be deliberate.
GOLDEN = {
    "plain": ["db0dacd97194a9ab1707950d6e3de730", "8aef91f3afe2040e81b4f9a002324879"],
    "salt": "5a4075786f6eb04cc9a1c963f100ad19",
    "lora": "468fbe293283ec4950c31c52ce9cf8be",
}


def test_known_answers_never_change() -> None:
    tokens = list(range(40))
    assert [h.hex() for h in block_hashes(tokens, 16, model=MODEL)] == GOLDEN["plain"]
    salted = block_hashes(tokens[:16], 16, model=MODEL, cache_salt="tenant-a")
    assert salted[0].hex() == GOLDEN["salt"]
    with_lora = block_hashes(tokens[:16], 16, model=MODEL, lora="sql-adapter")
    assert with_lora[0].hex() == GOLDEN["lora"]


def test_same_hashes_in_another_python_process_with_another_hash_seed() -> None:
    tokens = [random.Random(1).randrange(49152) for _ in range(200)]
    here = [h.hex() for h in block_hashes(tokens, 16, model=MODEL, cache_salt="s")]
    code = (
        "import sys; from shared.block_hash import block_hashes\n"
        "tokens = [int(t) for t in sys.argv[1].split(',')]\n"
        "print(','.join(h.hex() for h in block_hashes(tokens, 16, model=sys.argv[2], "
        "cache_salt='s')))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code, ",".join(map(str, tokens)), MODEL],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    assert out.split(",") == here


def test_one_128_bit_hash_per_full_block_only() -> None:
    assert block_hashes(list(range(15)), 16, model=MODEL) == []
    hashes = block_hashes(list(range(47)), 16, model=MODEL)
    assert len(hashes) == 2
    assert all(isinstance(h, bytes) and len(h) == DIGEST_SIZE == 16 for h in hashes)
    # The partial last block does not matter.
    assert block_hashes(list(range(32)) + [7] * 15, 16, model=MODEL) == hashes


def test_a_hash_names_the_whole_prefix() -> None:
    rng = random.Random(2)
    tokens = [rng.randrange(49152) for _ in range(16 * 6)]
    hashes = block_hashes(tokens, 16, model=MODEL)
    # A prompt with the same first three blocks shares exactly those three hashes.
    changed = list(tokens)
    changed[16 * 3 + 5] += 1
    other = block_hashes(changed, 16, model=MODEL)
    assert other[:3] == hashes[:3]
    assert all(a != b for a, b in zip(other[3:], hashes[3:], strict=True))
    # The same block after a different prefix gets a different hash.
    moved = block_hashes(tokens[16:32], 16, model=MODEL)
    assert moved[0] != hashes[1]
    assert len(set(hashes)) == len(hashes)


def test_a_chain_continues_from_its_parent() -> None:
    tokens = list(range(16 * 5))
    hashes = block_hashes(tokens, 16, model=MODEL, cache_salt="t")
    assert block_hashes(tokens[32:], 16, model=MODEL, parent=hashes[1]) == hashes[2:]


@pytest.mark.parametrize(
    "extra",
    [
        {"model": "another-model"},
        {"lora": "adapter-1"},
        {"lora": ""},
        {"cache_salt": "tenant-a"},
        {"cache_salt": ""},
    ],
)
def test_model_lora_and_salt_change_every_hash(extra: dict[str, str]) -> None:
    tokens = list(range(16 * 4))
    plain = block_hashes(tokens, 16, model=MODEL)
    keyed = block_hashes(tokens, 16, **{"model": MODEL, **extra})
    assert all(a != b for a, b in zip(plain, keyed, strict=True))


def test_two_tenants_never_share_a_block() -> None:
    tokens = list(range(16 * 8))
    a = set(block_hashes(tokens, 16, model=MODEL, cache_salt="tenant-a"))
    b = set(block_hashes(tokens, 16, model=MODEL, cache_salt="tenant-b"))
    assert not a & b


def test_no_collisions_over_many_related_prompts() -> None:
    rng = random.Random(3)
    base = [rng.randrange(49152) for _ in range(16 * 4)]
    hashes_seen: set[bytes] = set()
    prefixes_seen: set[tuple[int, ...]] = set()
    for _ in range(2000):
        tokens = list(base)
        tokens[rng.randrange(len(tokens))] = rng.randrange(49152)
        hashes_seen.update(block_hashes(tokens, 16, model=MODEL))
        prefixes_seen.update(tuple(tokens[: 16 * (i + 1)]) for i in range(4))
    # Equal prefixes share a hash; every distinct prefix has its own.
    assert len(hashes_seen) == len(prefixes_seen)


@pytest.mark.parametrize(
    ("tokens", "block_size", "parent"),
    [([-1] * 16, 16, None), ([1 << 32] * 16, 16, None), ([1] * 16, 0, None),
     ([1] * 16, 16, b"short")],
)
def test_bad_input_is_a_value_error(tokens: list[int], block_size: int, parent: bytes | None
                                    ) -> None:
    with pytest.raises(ValueError):
        block_hashes(tokens, block_size, model=MODEL, parent=parent)
