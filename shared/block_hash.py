"""Block hashes: one name per full block of a prompt, chained so that it names the prefix.

    h[i] = BLAKE2b-128(key = K(model, lora); h[i-1] || tokens of block i as uint32 LE)
    h[-1] = BLAKE2b-128(key = K(model, lora); "root" || cache_salt)

The gateway (to route) and the prefill workers (to find cached pages) both call
`block_hashes`, so the two always agree. BLAKE2b is cryptographic (a collision would
serve one prompt another prompt's KV) and, like the byte encoding here, the same in every
process, machine and Python version: no `hash()`, no pickle. Model and LoRA adapter key
every block; the per-tenant `cache_salt` enters the root, so through the chain it changes
every hash of the prompt and one tenant cannot probe another's cache by timing.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16  # bytes: 128-bit block names
_VERSION = b"kvrelay-blk-v1"  # BLAKE2b personalisation (<= 16 bytes): bump to change the scheme


def _field(value: str | None) -> bytes:
    # Length-prefixed, with None distinct from "": no two (model, lora) pairs encode alike.
    if value is None:
        return b"\x00"
    data = value.encode("utf-8")
    return b"\x01" + struct.pack("<Q", len(data)) + data


@functools.lru_cache(maxsize=256)
def _block_hasher(model: str, lora: str | None) -> hashlib.blake2b:
    """A keyed BLAKE2b, ready to copy: keying once per (model, lora) keeps hashing cheap."""
    key = hashlib.blake2b(_field(model) + _field(lora), digest_size=32, person=_VERSION).digest()
    return hashlib.blake2b(key=key, digest_size=DIGEST_SIZE, person=_VERSION)


@functools.lru_cache(maxsize=1024)
def _root(model: str, lora: str | None, cache_salt: str | None) -> bytes:
    hasher = _block_hasher(model, lora).copy()
    hasher.update(b"root" + _field(cache_salt))
    return hasher.digest()


def _token_bytes(token_ids: Sequence[int], count: int) -> bytes:
    try:
        return struct.pack(f"<{count}I", *token_ids[:count])
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    model: str,
    lora: str | None = None,
    cache_salt: str | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """16-byte digests, one per FULL block of `token_ids`, each naming its whole prefix.

    `parent` continues a chain (the hash of the block before token_ids[0]); the salt is
    then already part of it and `cache_salt` is ignored.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, not {block_size}")
    if parent is not None and len(parent) != DIGEST_SIZE:
        raise ValueError(f"a parent hash has {DIGEST_SIZE} bytes, not {len(parent)}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    data = _token_bytes(token_ids, num_blocks * block_size)
    base = _block_hasher(model, lora)
    previous = parent if parent is not None else _root(model, lora, cache_salt)
    step = 4 * block_size
    hashes: list[bytes] = []
    for start in range(0, len(data), step):
        hasher = base.copy()
        hasher.update(previous)
        hasher.update(data[start : start + step])
        previous = hasher.digest()
        hashes.append(previous)
    return hashes
