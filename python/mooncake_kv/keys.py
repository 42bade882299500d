"""Prefix-chained block keys from token ids.

A prompt's tokens are cut into blocks of ``block_tokens``; block *i*'s key is a digest of
every token from the start of the prompt to the end of block *i*, computed as a chain::

    h_0 = sha256(u32le(t) for t in block_0)
    h_i = sha256(h_{i-1} || u32le(t) for t in block_i)

so two prompts share a block's key exactly when they share the whole prefix up to it, and
the longest cached prefix of a prompt is the leading run of its keys that the store holds
(one ``prefix_match`` call). This is SGLang's page hash (``get_hash_str`` in
``sglang/srt/mem_cache/utils.py``, HiCache's keys): the same tokens and page size give the
same 64-hex digests. The others, for comparison (``INTEROP.md`` section 6):

- vLLM: ``hash_fn((parent_hash, tuple(block_tokens), extra_keys))`` per full block of
  ``block_size`` (16) tokens, ``sha256`` of a pickle by default (``sha256_cbor`` is the
  portable choice); the store key adds model, ranks and group around the hex digest.
- LMCache: ``H((prev, tuple(chunk_tokens), ()))`` per chunk of 256 tokens, Python's
  ``hash()`` by default (so a shared ``PYTHONHASHSEED`` is needed across processes); the key
  is ``model@world_size@worker_id@hash@dtype``.

What all three share, and these keys too: a block's key covers its whole prefix, so a hit
on block *i* means blocks 0..i are the same; what differs is the hash and the text around
it, which ``prefix`` (model name, rank, layer group, salt) is for.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from typing import Iterable, List, Optional

__all__ = ["block_hashes", "chain_keys"]

_U32 = "I" if array("I").itemsize == 4 else "L"


def _u32le(tokens: Iterable[int]) -> bytes:
    try:
        packed = array(_U32, tokens)
    except OverflowError:
        raise ValueError("token ids must be between 0 and 2**32 - 1") from None
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def block_hashes(
    token_ids: Iterable[int],
    block_tokens: int,
    *,
    partial: bool = False,
    seed: Optional[bytes] = None,
) -> List[bytes]:
    """The 32-byte chained digest of each block of ``token_ids``.

    Only full blocks have one unless ``partial`` is true, in which case a last block with
    fewer than ``block_tokens`` tokens gets one too (its key is only ever hit by the same
    prompt again; say so with ``put_chain(..., partial=True)``). ``seed`` starts the chain
    (a namespace: a model, an adapter, a cache salt), as SGLang's ``extra_key`` does.
    """
    if not isinstance(block_tokens, int) or block_tokens <= 0:
        raise ValueError(f"block_tokens must be a positive int, not {block_tokens!r}")
    if seed is not None and len(seed) != 32:
        raise ValueError("seed must be 32 bytes (a sha256 digest)")
    tokens = list(token_ids)
    digests: List[bytes] = []
    previous = seed
    end = len(tokens) if partial else len(tokens) - len(tokens) % block_tokens
    for start in range(0, end, block_tokens):
        h = hashlib.sha256()
        if previous is not None:
            h.update(previous)
        h.update(_u32le(tokens[start : start + block_tokens]))
        previous = h.digest()
        digests.append(previous)
    return digests


def chain_keys(
    token_ids: Iterable[int],
    block_tokens: int,
    *,
    prefix: str = "",
    suffix: str = "",
    partial: bool = False,
    seed: Optional[bytes] = None,
) -> List[str]:
    """The store key of each block of ``token_ids``: ``prefix + hex digest + suffix``.

    With ``prefix=""`` and ``suffix=""`` these are SGLang's page hashes; SGLang's own
    store keys are ``f"{model}_{hash}_{tp_rank}_k"`` and ``..._v`` around them. See
    :func:`block_hashes` for ``partial`` and ``seed``.
    """
    return [
        f"{prefix}{d.hex()}{suffix}"
        for d in block_hashes(token_ids, block_tokens, partial=partial, seed=seed)
    ]
