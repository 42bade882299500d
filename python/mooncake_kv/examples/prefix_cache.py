"""A reference serving loop: a real transformer that fetches its prompt-prefix KV from a store.

The trade the store exists for, end to end: a Llama-architecture causal LM (the
``transformers`` package's own attention and KV-cache code) keeps the key/value tensors of
every prompt block it computes in a :class:`mooncake_kv.Store`, and a later prompt that
shares a prefix fetches that prefix's KV instead of recomputing it. The loop uses the store
the way vLLM, SGLang and LMCache do:

1. the prompt is cut into blocks of ``block_tokens`` tokens, each keyed by
   :func:`mooncake_kv.chain_keys` (a block's key covers its whole prefix; the last block may
   be partial and has a key of its own);
2. one ``prefix_match`` call finds the longest cached run of blocks;
3. one ``get_into_batch`` call writes the KV of those blocks, every layer, straight into the
   tensors the model attends over (no intermediate copy);
4. only the rest of the prompt is prefilled;
5. the new blocks are stored with one ``put_chain`` (a partial last block marked as such).

**The KV layout.** One store value per block holds the block's KV for every layer, token
major: ``[token][layer][k, v][kv_head][head_dim]`` in the model's dtype (the shape of
:attr:`PrefixCachingLM.arena`, which is ``(max_tokens, layers, 2, kv_heads, head_dim)``).
Token-major order makes every block a contiguous range of the arena, so a whole prefix is
fetched by one batch of reads into one buffer, and each block is one value of
``block_tokens * layers * 2 * kv_heads * head_dim * itemsize`` bytes (1 MiB for the default
model and 64-token blocks) rather than ``2 * layers`` small ones. The model attends over
strided views of the arena (``arena[:n, layer, 0].permute(1, 0, 2)`` is the
``(kv_heads, n, head_dim)`` key tensor ``transformers`` expects), so the fetched bytes are
used where they land. The keys are ``f"{namespace}/{dtype}/b{block_tokens}/" + digest``:
the namespace must name the weights (a model name and revision; :class:`ModelSpec` builds
one from its config and seed), and the layout is part of the key, so two loops that would
read each other's bytes differently never share a key.

**On a GPU.** The store reads into and writes from host memory. A model on a CUDA device
attends over an arena in device memory, and the store's bytes pass through a host arena of
the same shape in pinned (page-locked) memory: a fetch is one ``get_into_batch`` into the
host arena, then one copy of the fetched range to the device (a DMA from pinned memory,
timed to its end); a put copies the new tokens' KV back to the host arena first. On the CPU
the two arenas are one, unless ``staging=True`` asks for the two-arena path there too (the
tests run it that way, so its logic is checked where there is no GPU). With an
:class:`~mooncake_kv.EmbeddedStore` that has an HBM tier on the model's GPU,
``device_reads=True`` fetches with ``get_into_device_batch`` instead: each block lands in the
device arena straight from the tier (device to device when the block is in HBM), with no
host copy.

**What it keeps from a real engine, and what not.** The cache object is ``transformers``'
``DynamicCache``, which concatenates the new tokens' KV onto the prefix once per layer (a
copy of the prefix that a full recompute does not make; the floor in the benchmark makes it
too). One request runs at a time (one arena; an engine has a paged pool). Decoded tokens are
not stored, only the prompt's blocks. The models :class:`ModelSpec` builds attend with
``transformers``' SDPA attention, except that a prefill after fewer cached tokens than it
computes runs the causal kernel, as an engine's attention kernel would (:func:`_prefix_sdpa`).
"""

from __future__ import annotations

import hashlib
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._native import MooncakeKVError
from ..keys import chain_keys

if TYPE_CHECKING:
    from .._native import Store

__all__ = ["ModelSpec", "Prefill", "PrefixCachingLM", "kv_difference", "reference_generate"]


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-architecture model built from a config with seeded random weights.

    No weights can be downloaded where this runs; random weights exercise exactly the same
    attention and KV-cache code, and the seed makes two builds identical. The default is the
    benchmark's model: 8 layers, hidden 1024, 16 query heads over 4 KV heads of 64 (grouped-
    query attention), 16 KiB of float32 KV per token.
    """

    layers: int = 8
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 2816
    vocab: int = 32000
    max_positions: int = 32768
    seed: int = 0

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelSpec":
        """A model small enough for unit tests (2 layers, hidden 128, 2 KV heads)."""
        return cls(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256,
                   vocab=512, max_positions=4096, seed=seed)

    def config(self) -> LlamaConfig:
        """The ``transformers`` config (no end-of-sequence token: greedy runs never stop)."""
        return LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab, max_position_embeddings=self.max_positions,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )

    @property
    def namespace(self) -> str:
        """A key namespace naming these weights: a digest of the config and the seed."""
        digest = hashlib.sha256(f"{self.config().to_json_string()}|seed={self.seed}".encode())
        return f"llama-random-{digest.hexdigest()[:16]}"

    def build(self, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
        """The model, in evaluation mode, on the CPU."""
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(self.config())
        finally:
            torch.random.set_rng_state(generator_state)
        model.set_attn_implementation(PREFIX_SDPA)
        return model.to(dtype).eval()


@dataclass
class Prefill:
    """What :meth:`PrefixCachingLM.prefill` did, with its timings in seconds."""

    logits: torch.Tensor
    """The next-token logits after the last prompt token, ``(vocab,)``."""
    cache: DynamicCache
    """The KV cache of the whole prompt, ready for decoding."""
    tokens: int
    """Prompt length."""
    cached_tokens: int
    """Tokens whose KV came from the store (not recomputed)."""
    hit_blocks: int = 0
    """Leading blocks the store held (``prefix_match``)."""
    fetched_blocks: int = 0
    """Of those, blocks fetched whole and of the expected length."""
    fetched_bytes: int = 0
    lookup_s: float = 0.0
    fetch_s: float = 0.0
    compute_s: float = 0.0
    put_s: float = 0.0
    stored_blocks: int = 0
    """Blocks put after the prefill (the ones the store did not hold)."""
    put_error: Optional[str] = None
    """Why storing the new blocks failed, if it did (the request itself still succeeds)."""

    @property
    def ttft_s(self) -> float:
        """Time to first token: lookup, fetch and prefill (the put comes after it)."""
        return self.lookup_s + self.fetch_s + self.compute_s


class PrefixCachingLM:
    """A causal LM whose prompt-prefix KV is kept in ``store`` (module docstring has the how).

    ``store`` is any :class:`mooncake_kv.Store` (a node's ``Client``, a ``Cluster``, an
    ``EmbeddedStore``), or ``None`` for a loop that recomputes every prompt. ``max_tokens``
    bounds the prompt length; the arena of that many tokens is allocated, and its pages
    touched, once here, as an engine allocates its KV pool at start. The arena is on the
    model's device; ``staging`` (by default: when that is not the CPU) adds the host arena
    the store's bytes pass through (module docstring, "On a GPU"); ``device_reads`` fetches
    into the device arena directly (an ``EmbeddedStore`` with an HBM tier on that device).
    """

    def __init__(self, model: LlamaForCausalLM, store: "Optional[Store]", *,
                 block_tokens: int = 64, namespace: str, max_tokens: int = 16384,
                 staging: Optional[bool] = None, device_reads: bool = False) -> None:
        if block_tokens <= 0 or max_tokens <= 0:
            raise ValueError("block_tokens and max_tokens must be positive")
        config = model.config
        self.model = model
        self.store = store
        self.block_tokens = block_tokens
        self.max_tokens = max_tokens
        parameter = next(model.parameters())
        dtype, self.device = parameter.dtype, parameter.device
        if device_reads and (self.device.type != "cuda"
                             or not hasattr(store, "get_into_device_batch")):
            raise ValueError("device_reads needs a model on a CUDA device and a store that "
                             "reads into device memory (an EmbeddedStore with an HBM tier)")
        self.device_reads = device_reads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (max_tokens, config.num_hidden_layers, 2, config.num_key_value_heads, head_dim)
        self.arena = torch.zeros(shape, dtype=dtype, device=self.device)
        """The KV the model attends over, token major (module docstring), on its device."""
        if staging is None:
            staging = self.device.type != "cpu"
        self.host = (torch.zeros(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
                     if staging else self.arena)
        """Where the store reads into and writes from: the arena itself on the CPU, else a
        host arena of the same shape (pinned for a CUDA device)."""
        self.token_bytes = self.arena[0].numel() * self.arena.element_size()
        """Bytes of KV per token, all layers."""
        # The host arena's bytes, for the store's buffer calls (a uint8 view works for any
        # dtype, bfloat16 included, which numpy has no type for).
        self._bytes = memoryview(self.host.view(-1).view(torch.uint8).numpy())
        self.key_prefix = f"{namespace}/{str(dtype).removeprefix('torch.')}/b{block_tokens}/"
        self._cache_kw = _cache_keyword(model)

    def block_keys(self, token_ids: Sequence[int]) -> List[str]:
        """The store key of each block of the prompt, a partial last block included."""
        return chain_keys(token_ids, self.block_tokens, prefix=self.key_prefix, partial=True)

    @property
    def staged(self) -> bool:
        """Whether the store's bytes pass through a host arena apart from the model's."""
        return self.host is not self.arena

    def block_buffer(self, index: int, tokens: int) -> memoryview:
        """Block ``index``'s bytes in the host arena (the arena itself on the CPU), for a
        prompt of ``tokens`` tokens."""
        start = index * self.block_tokens
        end = min(start + self.block_tokens, tokens)
        return self._bytes[start * self.token_bytes : end * self.token_bytes]

    def prefill(self, token_ids: Sequence[int], *, put: bool = True) -> Prefill:
        """Prefill a prompt: its cached prefix fetched, the rest computed, new blocks stored.

        At least the last token is always computed (its logits are the point), so a prompt
        whose every block is cached costs one token of compute. ``put=False`` leaves the
        store as it was (the benchmark repeats a prompt).
        """
        tokens = self._check(token_ids)
        started = time.perf_counter()
        keys = self.block_keys(tokens)
        hit = self.store.prefix_match(keys) if self.store is not None and keys else 0
        looked_up = time.perf_counter()
        fetched = self.fetch_blocks(keys[:hit], len(tokens))
        done_fetching = time.perf_counter()
        cached = min(fetched * self.block_tokens, len(tokens) - 1)
        logits, cache = self.prefill_after(tokens, cached)
        self.synchronize()  # a device runs the forward asynchronously: time its end
        computed = time.perf_counter()
        result = Prefill(
            logits=logits, cache=cache, tokens=len(tokens), cached_tokens=cached,
            hit_blocks=hit, fetched_blocks=fetched,
            fetched_bytes=min(fetched * self.block_tokens, len(tokens)) * self.token_bytes,
            lookup_s=looked_up - started, fetch_s=done_fetching - looked_up,
            compute_s=computed - done_fetching,
        )
        if put and self.store is not None and hit < len(keys):
            self._put(tokens, keys, hit, cache, result)
            result.put_s = time.perf_counter() - computed
        return result

    def prefill_after(self, token_ids: Sequence[int], cached_tokens: int) -> "tuple[torch.Tensor, DynamicCache]":
        """Prefill ``token_ids[cached_tokens:]`` over the KV already in the arena for the rest.

        This is the compute :meth:`prefill` does after its fetch, and, called alone with the
        arena filled beforehand, the floor a store is measured against: the same model with
        the cached KV already in its memory. Returns the last token's logits and the cache.
        """
        tokens = list(token_ids)
        if not 0 <= cached_tokens < len(tokens):
            raise ValueError("cached_tokens must leave at least one token to compute")
        cache = DynamicCache(config=self.model.config)
        if cached_tokens:
            for layer_index, layer in enumerate(cache.layers):
                # (tokens, kv_heads, head_dim) -> (1, kv_heads, tokens, head_dim): a strided
                # view of the arena, not a copy; the layer concatenates new tokens onto it.
                keys = self.arena[:cached_tokens, layer_index, 0].permute(1, 0, 2).unsqueeze(0)
                values = self.arena[:cached_tokens, layer_index, 1].permute(1, 0, 2).unsqueeze(0)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        input_ids = torch.tensor([tokens[cached_tokens:]], device=self.device)
        with torch.no_grad():
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
        return out.logits[0, -1], cache

    def copy_to_arena(self, cache: DynamicCache, start: int, end: int) -> None:
        """Copy tokens ``start..end`` of a cache's KV into the arena, in its token-major layout
        (the one copy a put needs: the cache holds each layer head-major), and on to the host
        arena when there is one."""
        with torch.no_grad():
            for layer_index, layer in enumerate(cache.layers):
                self.arena[start:end, layer_index, 0] = layer.keys[0, :, start:end].transpose(0, 1)
                self.arena[start:end, layer_index, 1] = layer.values[0, :, start:end].transpose(0, 1)
            if self.staged:
                self.host[start:end].copy_(self.arena[start:end])

    def generate(self, token_ids: Sequence[int], max_new_tokens: int = 32) -> "tuple[List[int], Prefill]":
        """Greedy decoding after :meth:`prefill`: the new tokens, and the prefill's record."""
        prefill = self.prefill(token_ids)
        return greedy_decode(self.model, prefill.logits, prefill.cache, max_new_tokens,
                             self._cache_kw), prefill

    def _check(self, token_ids: Sequence[int]) -> List[int]:
        tokens = [int(t) for t in token_ids]
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) > self.max_tokens:
            raise ValueError(f"the prompt has {len(tokens)} tokens; this loop holds "
                             f"{self.max_tokens} (max_tokens)")
        vocab = self.model.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        return tokens

    def fetch_blocks(self, keys: List[str], tokens: int) -> int:
        """Read the first ``len(keys)`` blocks of a prompt of ``tokens`` tokens into the
        arena with one batch call; returns how many leading blocks arrived whole."""
        if not keys:
            return 0
        assert self.store is not None
        buffers = [self.block_buffer(i, tokens) for i in range(len(keys))]
        if self.device_reads:
            # Block i is tokens i*B.. of the device arena, contiguous (token major).
            ptrs = [self.arena[i * self.block_tokens].data_ptr() for i in range(len(keys))]
            lengths = self.store.get_into_device_batch(keys, ptrs, [len(b) for b in buffers])
        else:
            lengths = self.store.get_into_batch(keys, buffers)
        # A block evicted since the lookup is a miss; the run of usable blocks ends there.
        # A value of another length under a key that names its exact tokens and layout is
        # not this loop's KV: it ends the run too, and those tokens are recomputed.
        whole = next((index for index, (length, buffer) in enumerate(zip(lengths, buffers))
                      if length != len(buffer)), len(keys))
        if self.staged and not self.device_reads and whole:
            # One copy of the fetched range to the device (a DMA from pinned memory), counted
            # in the fetch.
            end = min(whole * self.block_tokens, tokens)
            self.arena[:end].copy_(self.host[:end], non_blocking=True)
        self.synchronize()
        return whole

    def synchronize(self) -> None:
        """Waits for the work queued on the model's device (nothing to wait for on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _put(self, tokens: List[int], keys: List[str], first: int, cache: DynamicCache,
             result: Prefill) -> None:
        """Store blocks ``first..`` (the store's chain resumes after ``keys[first - 1]``)."""
        assert self.store is not None
        self.copy_to_arena(cache, first * self.block_tokens, len(tokens))
        buffers = [self.block_buffer(i, len(tokens)) for i in range(first, len(keys))]
        try:
            self.store.put_chain(keys[first:], buffers, parent=keys[first - 1] if first else None,
                                 partial=len(tokens) % self.block_tokens != 0)
            result.stored_blocks = len(buffers)
        except MooncakeKVError as error:  # a cache that cannot take a block still served
            result.put_error = f"{type(error).__name__}: {error}"


PREFIX_SDPA = "prefix_sdpa"
"""The attention :meth:`ModelSpec.build` gives its models: ``transformers``' SDPA attention,
except for a prefill over fewer cached tokens than it computes (see :func:`_prefix_sdpa`)."""


def _prefix_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs):
    """SDPA attention for one unpadded sequence whose first ``past`` keys are cached.

    ``transformers`` hands SDPA an explicit mask as soon as the keys outnumber the queries (a
    prefill after a cached prefix), and with a mask SDPA runs its kernel over every query-key
    pair and copies the grouped KV heads out to every query head; with no cached keys it runs
    the causal kernel, which skips the pairs a query may not see, on the grouped heads as
    they are. On two cores the masked form made 1,024 tokens after 64 cached ones slower to
    prefill than 1,088 from scratch. A serving engine's attention kernel aligns the causal
    mask to the last query instead (flash-attention's bottom-right causal, over a paged KV).
    Where fewer keys are cached than queries computed, this does the same with the causal
    kernel: it runs it over all ``past + q`` keys with ``past`` placeholder queries in front
    and drops their rows (attention rows are independent, so the rows kept are exact). Else
    the masked form is the cheaper one and is kept.

    Only for a batch of one with no padding, where the mask is the causal pattern alone: the
    loop here runs one request at a time.
    """
    batch, heads, queries, dim = query.shape
    past = key.shape[2] - queries
    if batch == 1 and queries > 1 and 0 < past < queries:
        padded = torch.cat([query.new_zeros(batch, heads, past, dim), query], dim=2)
        output, weights = sdpa_attention_forward(module, padded, key, value, None,
                                                 **{**kwargs, "is_causal": True})
        # (batch, queries, heads, dim): the placeholder rows come first.
        return output[:, past:], weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PREFIX_SDPA, _prefix_sdpa)
AttentionMaskInterface.register(PREFIX_SDPA, sdpa_mask)


def _cache_keyword(model: LlamaForCausalLM) -> str:
    """The forward's name for the cache: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the old name still works, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_decode(model: LlamaForCausalLM, logits: torch.Tensor, cache: DynamicCache,
                  max_new_tokens: int, cache_kw: str = "past_key_values") -> List[int]:
    """``max_new_tokens`` greedy tokens, starting from a prefill's logits and cache."""
    generated = [int(torch.argmax(logits))]
    with torch.no_grad():
        while len(generated) < max_new_tokens:
            input_ids = torch.tensor([[generated[-1]]], device=logits.device)
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                        **{cache_kw: cache})
            generated.append(int(torch.argmax(out.logits[0, -1])))
    return generated[:max_new_tokens]


def reference_generate(model: LlamaForCausalLM, token_ids: Sequence[int],
                       max_new_tokens: int = 32) -> "tuple[torch.Tensor, List[int], List[tuple[torch.Tensor, torch.Tensor]]]":
    """The full recompute, with none of this module's code: a plain forward over the whole
    prompt, then greedy decoding. Returns the first token's logits, the greedy tokens and
    the prompt's KV (per layer, keys and values of shape ``(1, kv_heads, tokens, head_dim)``).
    """
    cache_kw = _cache_keyword(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        input_ids = torch.tensor([list(token_ids)], device=model.device)
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    logits = out.logits[0, -1]
    return logits, greedy_decode(model, logits, cache, max_new_tokens, cache_kw), kv


def kv_difference(cache: DynamicCache, reference: "List[tuple[torch.Tensor, torch.Tensor]]") -> float:
    """The largest absolute difference between a cache's KV and a reference's, over the
    reference's tokens. Attention is blind to the order of the cached tokens (their positions
    are already rotated into the keys), so two swapped blocks leave the logits unchanged:
    comparing the KV itself is what catches that."""
    worst = 0.0
    for layer, (keys, values) in zip(cache.layers, reference):
        tokens = keys.shape[-2]
        worst = max(worst, (layer.keys[..., :tokens, :] - keys).abs().max().item(),
                    (layer.values[..., :tokens, :] - values).abs().max().item())
    return worst
