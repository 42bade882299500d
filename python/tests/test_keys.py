"""Prefix-chained keys: SGLang's page hash, and the property that makes prefix matching
work (a key covers its whole prefix)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from mooncake_kv import block_hashes, chain_keys


def sglang_reference(tokens, page):
    # sglang/srt/mem_cache/utils.py get_hash_str, for token ids below 2**32.
    out, prev = [], None
    for start in range(0, len(tokens) - len(tokens) % page, page):
        h = hashlib.sha256()
        if prev is not None:
            h.update(prev)
        for t in tokens[start : start + page]:
            h.update(struct.pack("<I", t))
        prev = h.digest()
        out.append(prev.hex())
    return out


def test_the_keys_are_sglangs_page_hashes() -> None:
    tokens = [(i * 7919) % 150_000 for i in range(64 * 4 + 10)]
    assert chain_keys(tokens, 64) == sglang_reference(tokens, 64)


def test_a_key_covers_its_whole_prefix() -> None:
    a = list(range(100))
    b = a[:50] + [9999] + a[51:]
    ka, kb = chain_keys(a, 16), chain_keys(b, 16)
    assert ka[:3] == kb[:3] and all(x != y for x, y in zip(ka[3:], kb[3:]))
    assert chain_keys(a, 16, partial=True)[-1] not in ka
    assert len(chain_keys(a, 16, partial=True)) == 7
    assert chain_keys(a, 16, prefix="m/", suffix="_k")[0] == "m/" + ka[0] + "_k"
    assert block_hashes(a, 16, seed=bytes(32))[0] != block_hashes(a, 16)[0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        chain_keys([1, 2], 0)
    with pytest.raises(ValueError):
        chain_keys([-1], 1)
    with pytest.raises(ValueError):
        chain_keys([2**32], 1)
    with pytest.raises(ValueError):
        block_hashes([1], 1, seed=b"short")
