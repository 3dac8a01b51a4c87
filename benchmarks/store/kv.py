"""A real model's KV cache through the pool: prefix reuse with transformers.

A small Llama-style causal LM is built from a config with random weights (no
download). A "producer" computes the KV cache of a long prompt prefix once and
stores it as 16-token KV blocks, keyed by vLLM's own chained prefix-block
hashes (``beluga.keys.vllm_block_hashes``, sha256_cbor). Then one request is
answered two ways:

* **full**: prefill the whole prompt (prefix + suffix) and take the next-token
  logits;
* **cached**: hash the prompt's blocks, ask the pool how many leading blocks it
  has (``lookup_prefix``), copy those KV blocks straight from pool memory into
  one tensor (``get_kv_blocks``: one lookup round trip), hand them to the model
  as its past key/values, and prefill only the rest.

Time-to-first-token (TTFT) is the wall time from having the token ids to
having the next-token logits. The two logits must agree: the cached KV is the
very same float32 numbers the producer computed, so the only difference is
floating-point summation order (the suffix is computed in a smaller batch,
which changes how BLAS and SDPA block their reductions), see ``LOGITS_ATOL``.

Needs ``torch`` and ``transformers`` (the ``test`` extra); imported lazily.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from beluga.keys import vllm_block_hashes

BLOCK_TOKENS = 16

LOGITS_ATOL = 2e-3
"""Allowed max |full - cached| over the next-token logits (float32).

Both paths do the same arithmetic on the same weights and the same cached KV
bits; what differs is the order of floating-point additions (a GEMM over
prefix+suffix rows vs one over the suffix rows only, attention softmax over
the same keys in different tiles). float32 has a 2^-24 (6e-8) relative
epsilon; summing thousands of terms through a few layers turns that into
differences around 1e-6..1e-4 of logits whose magnitude is ~1 here. 2e-3 is a
generous bound for that, yet far below what a wrong block, a wrong position or
a missing token would cause (differences of order 0.1-1, checked by the test).
The argmax (the greedy next token) must be identical as well.
"""


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style config: grouped-query attention, RoPE, SwiGLU, RMSNorm (random weights)."""

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


BENCH_MODEL = ModelSize()
"""Small enough that an 8K-token prefill takes seconds on two CPU cores (attention is quadratic)."""
TEST_MODEL = ModelSize(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def build_model(size: ModelSize, *, seed: int = 0):
    """A LlamaForCausalLM with random weights from a config (nothing is downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=size.vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers, num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads, max_position_embeddings=size.max_position_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def kv_spec(model):
    from beluga.tensor import KVBlockSpec

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return KVBlockSpec(layers=c.num_hidden_layers, kv_heads=c.num_key_value_heads, head_dim=head_dim,
                       block_tokens=BLOCK_TOKENS, dtype="float32")


def cache_salt_for(model) -> str:
    """The model's identity: KV is only reusable under the same weights.

    vLLM keeps one prefix cache per engine (per model), so its block hashes do
    not name the model; in a pool that several models share, the model goes in
    as vLLM's cache salt, the key a request uses to keep its blocks apart.
    """
    c = model.config
    return f"llama-random-{c.hidden_size}x{c.num_hidden_layers}-seed0"


def block_keys(ids, salt: str) -> list[bytes]:
    """The keys of the full 16-token blocks of ``ids``: vLLM's hashes for a request with cache salt ``salt``."""
    n = len(ids) // BLOCK_TOKENS
    extra = [(("cache_salt", salt),)] + [None] * (n - 1) if n else None
    return vllm_block_hashes(ids, block_size=BLOCK_TOKENS, algo="sha256_cbor", extra_keys=extra)


def _layer_kv(cache, layer: int):
    """(key, value) tensors of one layer, shape (batch, kv_heads, tokens, head_dim), across transformers versions."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def cache_to_blocks(cache, spec, n_blocks: int):
    """The first ``n_blocks`` 16-token blocks of a model's KV cache as one (n, layers, 2, 16, kv_heads, head_dim) tensor."""
    import torch

    t = n_blocks * spec.block_tokens
    per_layer = []
    for layer in range(spec.layers):
        k, v = _layer_kv(cache, layer)
        per_layer.append(torch.stack([k[0, :, :t], v[0, :, :t]]))  # (2, kv_heads, t, head_dim)
    kv = torch.stack(per_layer)  # (layers, 2, kv_heads, t, head_dim)
    kv = kv.reshape(spec.layers, 2, spec.kv_heads, n_blocks, spec.block_tokens, spec.head_dim)
    return kv.permute(3, 0, 1, 4, 2, 5).contiguous()  # (n, layers, 2, block_tokens, kv_heads, head_dim)


def blocks_to_cache(blocks, spec, config):
    """A DynamicCache holding the KV of ``blocks`` (n, layers, 2, 16, kv_heads, head_dim)."""
    from transformers import DynamicCache

    n = blocks.shape[0]
    t = n * spec.block_tokens
    # (n, layers, 2, bt, h, d) -> (layers, 2, h, n, bt, d) -> (layers, 2, 1, h, t, d)
    kv = blocks.permute(1, 2, 4, 0, 3, 5).reshape(spec.layers, 2, 1, spec.kv_heads, t, spec.head_dim)
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # older transformers: layers are created on first update
        cache = DynamicCache()
    for layer in range(spec.layers):
        cache.update(kv[layer, 0].contiguous(), kv[layer, 1].contiguous(), layer)
    return cache


def publish_prefix(client, model, prefix_ids) -> int:
    """The producer: prefill ``prefix_ids`` once and store its full KV blocks in the pool. -> blocks stored."""
    import torch

    from beluga.tensor import put_kv_blocks

    spec = kv_spec(model)
    keys = block_keys(prefix_ids, cache_salt_for(model))
    with torch.no_grad():
        out = model(torch.tensor([prefix_ids]), use_cache=True)
    blocks = cache_to_blocks(out.past_key_values, spec, len(keys))
    put_kv_blocks(client, keys, list(blocks), spec)
    return len(keys)


def next_token_full(model, ids):
    """Prefill everything; -> (next-token logits, seconds)."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=True).logits[0, -1]
    return logits, time.perf_counter() - t0


def next_token_cached(client, model, ids):
    """Load the longest cached prefix from the pool, prefill the rest; -> (logits, seconds, blocks loaded, load seconds)."""
    import torch

    from beluga.tensor import get_kv_blocks

    t0 = time.perf_counter()
    spec = kv_spec(model)
    # At least one token must be computed to get logits: never reuse the block holding the last token.
    keys = block_keys(ids[:-1], cache_salt_for(model))
    n = client.lookup_prefix(keys) if keys else 0
    past = None
    if n:
        blocks = torch.empty((n, *spec.shape), dtype=spec.torch_dtype)
        ok = get_kv_blocks(client, keys[:n], list(blocks))
        if not all(ok):
            n = ok.index(False)  # evicted between lookup and load: use what did load
            blocks = blocks[:n]
        if n:
            past = blocks_to_cache(blocks, spec, model.config)
    t_loaded = time.perf_counter()
    with torch.no_grad():
        rest = torch.tensor([ids[n * spec.block_tokens :]])
        logits = model(rest, past_key_values=past, use_cache=True).logits[0, -1]
    t1 = time.perf_counter()
    return logits, t1 - t0, n, t_loaded - t0


@dataclass
class PrefixResult:
    prefix_tokens: int
    suffix_tokens: int
    blocks_loaded: int
    kv_bytes_loaded: int
    ttft_full_s: float
    ttft_cached_s: float
    load_s: float
    max_abs_logit_diff: float
    argmax_equal: bool
    logits_match: bool
    ttft_reduction: float = 0.0
    speedup: float = 0.0
    rounds_full_s: list = field(default_factory=list)
    rounds_cached_s: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def prefix_reuse(client, model, prefix_tokens: int, *, suffix_tokens: int = 64, rounds: int = 3,
                 seed: int = 1) -> PrefixResult:
    """Publish a prefix's KV, then time full vs cached next-token prefill (medians of ``rounds``)."""
    import random

    import torch

    rng = random.Random(seed + prefix_tokens)
    vocab = model.config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(prefix_tokens)]
    suffix = [rng.randrange(vocab) for _ in range(suffix_tokens)]
    ids = prefix + suffix
    publish_prefix(client, model, prefix)
    spec = kv_spec(model)
    full_t, cached_t, load_t = [], [], []
    diff, same, n = 0.0, True, 0
    for _ in range(rounds):
        ref, tf = next_token_full(model, ids)
        got, tc, n, tl = next_token_cached(client, model, ids)
        full_t.append(tf)
        cached_t.append(tc)
        load_t.append(tl)
        diff = max(diff, float((ref - got).abs().max()))
        same = same and int(torch.argmax(ref)) == int(torch.argmax(got))
    f, c = statistics.median(full_t), statistics.median(cached_t)
    return PrefixResult(
        prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens, blocks_loaded=n,
        kv_bytes_loaded=n * spec.nbytes, ttft_full_s=f, ttft_cached_s=c, load_s=statistics.median(load_t),
        max_abs_logit_diff=diff, argmax_equal=same, logits_match=same and diff <= LOGITS_ATOL,
        ttft_reduction=1 - c / f if f else 0.0, speedup=f / c if c else 0.0,
        rounds_full_s=full_t, rounds_cached_s=cached_t,
    )
