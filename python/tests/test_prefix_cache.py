"""The reference serving loop (mooncake_kv.examples.prefix_cache) on a real transformer.

A prompt's prefix KV fetched from the store must give the model the same output as a full
recompute: the first token's logits within 1e-4 and the next 32 greedy tokens identical, at
0, 50, 90 and 100% of the prompt's blocks cached, on every path (embedded, shared memory,
tcp), and the prompt's KV in the loop's cache within 1e-4 of the recomputed KV; also through
the host staging arena a model on a GPU takes, run here on the CPU. The last tests show the
check can fail: one block's bytes swapped with another's (which attention,
blind to the order of cached tokens, does not see in the logits: the KV comparison does), or
shifted by one element.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Tuple

import pytest

if os.environ.get("MOONCAKE_KV_REQUIRE_MODEL") != "1":
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

import torch  # noqa: E402

import mooncake_kv  # noqa: E402
from conftest import unique  # noqa: E402
from mooncake_kv.examples.prefix_cache import (  # noqa: E402
    ModelSpec,
    Prefill,
    PrefixCachingLM,
    kv_difference,
    reference_generate,
)

BLOCK = 16
PROMPT = 10 * BLOCK + 8  # ten full blocks and a partial one
NEW_TOKENS = 32
TOLERANCE = 1e-4

SPEC = ModelSpec.tiny(seed=7)
Reference = Tuple[torch.Tensor, List[int], List[Tuple[torch.Tensor, torch.Tensor]]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return SPEC.build()


@pytest.fixture(scope="module")
def prompt() -> List[int]:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(0, SPEC.vocab, (PROMPT,), generator=generator).tolist()


@pytest.fixture(scope="module")
def reference(model: torch.nn.Module, prompt: List[int]) -> Reference:
    return reference_generate(model, prompt, NEW_TOKENS)


def difference(prefill: Prefill, reference: Reference) -> float:
    """The largest difference from the recompute: first-token logits, and the prompt's KV."""
    logits = (prefill.logits - reference[0]).abs().max().item()
    return max(logits, kv_difference(prefill.cache, reference[2]))


def serving_loop(model: torch.nn.Module, store: mooncake_kv.Store, namespace: str,
                 staging: bool = False) -> PrefixCachingLM:
    """A fresh loop: zeroed arenas, so nothing but a fetch can put KV in them. With
    ``staging``, the store's bytes pass through a host arena apart from the model's."""
    return PrefixCachingLM(model, store, block_tokens=BLOCK, namespace=namespace, max_tokens=512,
                           staging=staging)


def cache_blocks(model: torch.nn.Module, store: mooncake_kv.Store, namespace: str,
                 prompt: List[int], blocks: int, staging: bool = False) -> None:
    """Put the KV of the prompt's first ``blocks`` blocks (a partial last one included when
    ``blocks`` covers it), computed by a loop that finds none of them."""
    if blocks:
        loop = serving_loop(model, store, namespace, staging)
        seeded = loop.prefill(prompt[: blocks * BLOCK])
        assert seeded.cached_tokens == 0 and seeded.put_error is None
        assert seeded.stored_blocks == blocks


@pytest.fixture
def namespace() -> Iterator[str]:
    yield unique("prefix-test")


@pytest.mark.parametrize("percent", [0, 50, 90, 100])
def test_cached_prefix_gives_the_recompute_output(
    model: torch.nn.Module, store: mooncake_kv.Store, namespace: str, prompt: List[int],
    reference: Reference, percent: int,
) -> None:
    blocks = len(serving_loop(model, None, namespace).block_keys(prompt))
    cached_blocks = blocks * percent // 100
    cache_blocks(model, store, namespace, prompt, cached_blocks)

    loop = serving_loop(model, store, namespace)
    tokens, prefill = loop.generate(prompt, NEW_TOKENS)

    assert prefill.hit_blocks == cached_blocks == prefill.fetched_blocks
    assert prefill.cached_tokens == min(cached_blocks * BLOCK, PROMPT - 1)
    assert prefill.fetched_bytes == min(cached_blocks * BLOCK, PROMPT) * loop.token_bytes
    assert difference(prefill, reference) <= TOLERANCE
    assert tokens == reference[1]
    # The blocks it lacked are in the store now: the same prompt again is all hits.
    assert store.prefix_match(loop.block_keys(prompt)) == blocks


@pytest.mark.parametrize("percent", [50, 100])
def test_through_a_host_staging_arena(
    model: torch.nn.Module, store: mooncake_kv.Store, namespace: str, prompt: List[int],
    reference: Reference, percent: int,
) -> None:
    """The path of a model on a GPU (store, host arena, the model's arena, and back for the
    put), on the CPU: the recompute's output, and both arenas holding what the store holds."""
    blocks = len(serving_loop(model, None, namespace).block_keys(prompt))
    cached_blocks = blocks * percent // 100
    cache_blocks(model, store, namespace, prompt, cached_blocks, staging=True)

    loop = serving_loop(model, store, namespace, staging=True)
    assert loop.staged and loop.host.data_ptr() != loop.arena.data_ptr()
    tokens, prefill = loop.generate(prompt, NEW_TOKENS)

    assert prefill.fetched_blocks == cached_blocks
    assert difference(prefill, reference) <= TOLERANCE
    assert tokens == reference[1]
    # The fetched blocks and the ones put after the prefill: the same bytes in both arenas
    # and in the store.
    assert torch.equal(loop.arena[:PROMPT], loop.host[:PROMPT])
    for index, key in enumerate(loop.block_keys(prompt)):
        assert bytes(loop.block_buffer(index, PROMPT)) == store.get(key)


def test_the_fetch_lands_in_the_arena(model: torch.nn.Module, store: mooncake_kv.Store,
                                      namespace: str, prompt: List[int]) -> None:
    cache_blocks(model, store, namespace, prompt, 4)
    loop = serving_loop(model, store, namespace)
    loop.prefill(prompt, put=False)
    for index, key in enumerate(loop.block_keys(prompt)[:4]):
        assert bytes(loop.block_buffer(index, PROMPT)) == store.get(key)


def test_a_partial_block_is_only_hit_by_the_same_prompt(
    model: torch.nn.Module, store: mooncake_kv.Store, namespace: str, prompt: List[int],
    reference: Reference,
) -> None:
    serving_loop(model, store, namespace).prefill(prompt)  # ten full blocks and a partial
    longer = prompt + [1, 2, 3, 4, 5, 6, 7, 8, 9]
    keys = serving_loop(model, None, namespace).block_keys(longer)
    assert store.prefix_match(keys) == 10  # the partial block's key covers 8 tokens, not 16

    again = serving_loop(model, store, namespace).prefill(prompt)
    assert again.hit_blocks == 11 and again.cached_tokens == PROMPT - 1
    assert difference(again, reference) <= TOLERANCE


def test_a_block_gone_since_the_lookup_is_recomputed(
    model: torch.nn.Module, store: mooncake_kv.Store, namespace: str, prompt: List[int],
    reference: Reference,
) -> None:
    cache_blocks(model, store, namespace, prompt, 8)
    loop = serving_loop(model, store, namespace)
    keys = loop.block_keys(prompt)
    lookup = store.prefix_match

    def answer_then_remove(asked: List[str]) -> int:
        answer = lookup(asked)
        assert store.remove(keys[5])  # evicted between the lookup and the read
        return answer

    class Racing:
        def __getattr__(self, name: str) -> object:
            return answer_then_remove if name == "prefix_match" else getattr(store, name)

    loop.store = Racing()  # type: ignore[assignment]
    prefill = loop.prefill(prompt)
    assert prefill.hit_blocks == 8 and prefill.fetched_blocks == 5
    assert prefill.cached_tokens == 5 * BLOCK
    assert difference(prefill, reference) <= TOLERANCE


def corrupt_and_compare(model: torch.nn.Module, store: mooncake_kv.Store, namespace: str,
                        prompt: List[int], reference: Reference,
                        corrupt, staging: bool = False) -> float:
    """Cache every block, let ``corrupt(keys)`` damage the stored KV, and return the largest
    difference the loop then shows against the recompute."""
    cache_blocks(model, store, namespace, prompt, PROMPT // BLOCK)
    loop = serving_loop(model, store, namespace, staging)
    keys = loop.block_keys(prompt)
    corrupt(keys)
    prefill = loop.prefill(prompt, put=False)
    assert prefill.cached_tokens == PROMPT // BLOCK * BLOCK  # the damage is not a miss
    return difference(prefill, reference)


def replace(store: mooncake_kv.Store, key: str, value: bytes) -> None:
    assert store.remove(key)
    store.put(key, value)


@pytest.mark.parametrize("staging", [False, True])
def test_two_swapped_blocks_fail_the_comparison(
    model: torch.nn.Module, store: mooncake_kv.Store, namespace: str, prompt: List[int],
    reference: Reference, staging: bool,
) -> None:
    def swap(keys: List[str]) -> None:
        third, fourth = store.get(keys[2]), store.get(keys[3])
        assert third is not None and fourth is not None and third != fourth
        replace(store, keys[2], fourth)
        replace(store, keys[3], third)

    assert corrupt_and_compare(model, store, namespace, prompt, reference, swap,
                               staging) > 10 * TOLERANCE


def test_a_block_shifted_by_one_element_fails_the_comparison(
    model: torch.nn.Module, store: mooncake_kv.Store, namespace: str, prompt: List[int],
    reference: Reference,
) -> None:
    def shift(keys: List[str]) -> None:
        value = store.get(keys[6])
        assert value is not None
        replace(store, keys[6], value[4:] + value[:4])  # one float32 to the left

    assert corrupt_and_compare(model, store, namespace, prompt, reference, shift) > 10 * TOLERANCE


def test_bad_prompts_are_refused(model: torch.nn.Module) -> None:
    loop = PrefixCachingLM(model, None, block_tokens=BLOCK, namespace="n", max_tokens=64)
    for bad, message in [([], "empty"), ([1] * 65, "max_tokens"), ([SPEC.vocab], "token ids"),
                         ([-1], "token ids")]:
        with pytest.raises(ValueError, match=message):
            loop.prefill(bad)
    with pytest.raises(ValueError):
        PrefixCachingLM(model, None, block_tokens=0, namespace="n")
    with mooncake_kv.EmbeddedStore(4 << 20) as store, pytest.raises(ValueError, match="CUDA"):
        PrefixCachingLM(model, store, namespace="n", device_reads=True)  # a model on the CPU


@pytest.mark.parametrize("device_reads", [False, True])
def test_on_a_gpu(prompt: List[int], device_reads: bool) -> None:
    """A model on a CUDA device: its KV through pinned host memory (any store), or straight
    into device memory from an embedded store's HBM tier. Skips without a GPU (and, for the
    HBM tier, without a wheel built with the `cuda` feature)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = SPEC.build().to("cuda")
    logits, tokens, kv = reference_generate(model, prompt, NEW_TOKENS)
    try:
        store = mooncake_kv.EmbeddedStore(64 << 20, hbm_bytes=(64 << 20) if device_reads else None)
    except mooncake_kv.MooncakeKVError as error:
        pytest.skip(f"no HBM tier here: {error}")
    with store:
        namespace = unique("gpu")
        seeded = PrefixCachingLM(model, store, block_tokens=BLOCK, namespace=namespace,
                                 max_tokens=512).prefill(prompt[: 8 * BLOCK])
        assert seeded.stored_blocks == 8 and seeded.put_error is None
        loop = PrefixCachingLM(model, store, block_tokens=BLOCK, namespace=namespace,
                               max_tokens=512, device_reads=device_reads)
        assert loop.staged and loop.host.is_pinned() and loop.arena.is_cuda
        generated, prefill = loop.generate(prompt, NEW_TOKENS)
        assert prefill.fetched_blocks == 8 and prefill.cached_tokens == 8 * BLOCK
        assert difference(prefill, (logits, tokens, kv)) <= TOLERANCE
        assert generated == tokens


def test_the_model_and_its_namespace_follow_the_seed() -> None:
    first, second = ModelSpec.tiny(seed=3).build(), ModelSpec.tiny(seed=3).build()
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert ModelSpec.tiny(seed=3).namespace == ModelSpec.tiny(seed=3).namespace
    assert ModelSpec.tiny(seed=3).namespace != ModelSpec.tiny(seed=4).namespace
    assert ModelSpec.tiny().namespace != ModelSpec().namespace


@pytest.mark.parametrize("cached_blocks, causal_kernel", [(3, True), (8, False)])
def test_a_prefill_over_fewer_cached_tokens_runs_the_causal_kernel(
    model: torch.nn.Module, prompt: List[int], reference: Reference,
    monkeypatch: pytest.MonkeyPatch, cached_blocks: int, causal_kernel: bool,
) -> None:
    """Fewer cached tokens than computed: SDPA's causal kernel over placeholder queries, no
    mask; more: the masked form. Both give the recompute's output."""
    loop = PrefixCachingLM(model, None, block_tokens=BLOCK, namespace="n", max_tokens=512)
    loop.copy_to_arena(loop.prefill(prompt).cache, 0, PROMPT)
    calls: List[Tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((bool(kwargs.get("is_causal")), kwargs.get("attn_mask") is None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    logits, cache = loop.prefill_after(prompt, cached_blocks * BLOCK)

    assert len(calls) == SPEC.layers
    assert all(call == (causal_kernel, causal_kernel) for call in calls)
    assert (logits - reference[0]).abs().max().item() <= TOLERANCE
    assert kv_difference(cache, reference[2]) <= TOLERANCE
