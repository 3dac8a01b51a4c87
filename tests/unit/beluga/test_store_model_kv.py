"""A real (tiny, random-weight) transformers Llama through the pool: prefix KV reuse gives the same logits.

The full-size version (1K/4K/8K-token prefixes, timed) runs in `beluga bench`; this is
the correctness check at a size that takes a second or two. Nothing is downloaded.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.store import kv  # noqa: E402
from beluga.keys import vllm_block_hashes  # noqa: E402
from beluga.layout import MiB  # noqa: E402
from beluga.tensor import put_kv_blocks  # noqa: E402

from beluga_store_support import LocalStore  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return kv.build_model(kv.TEST_MODEL)


@pytest.fixture
def kvstore(pool_path):
    s = LocalStore(pool_path, size_bytes=32 * MiB, segment_size_bytes=1 * MiB)
    yield s
    s.close()


@pytest.mark.parametrize("prefix_tokens", [64, 200])
def test_cached_prefix_gives_the_same_next_token_logits(kvstore, model, prefix_tokens):
    c = kvstore.client()
    r = kv.prefix_reuse(c, model, prefix_tokens, suffix_tokens=24, rounds=1)
    assert r.blocks_loaded == prefix_tokens // kv.BLOCK_TOKENS  # a partial last block is recomputed
    assert r.argmax_equal and r.max_abs_logit_diff <= kv.LOGITS_ATOL, r
    assert r.logits_match
    assert c.client_stats().corrupt_misses == 0


def test_keys_are_vllms_block_hashes_and_a_new_prompt_misses(kvstore, model):
    c = kvstore.client()
    prefix = list(range(7, 7 + 96))
    assert kv.publish_prefix(c, model, prefix) == 6
    # The blocks are found under the hashes vLLM computes for this prompt, salted with the model's name.
    salt = kv.cache_salt_for(model)
    keys = vllm_block_hashes(prefix, block_size=16, algo="sha256_cbor",
                             extra_keys=[(("cache_salt", salt),)] + [None] * 5)
    assert c.lookup_prefix(keys) == 6
    # Same tokens under another model (another salt) or unsalted: different keys, nothing to reuse.
    other = vllm_block_hashes(prefix, extra_keys=[(("cache_salt", "another-model"),)] + [None] * 5)
    assert c.lookup_prefix(other) == 0
    assert c.lookup_prefix(vllm_block_hashes(prefix)) == 0
    # A prompt sharing only the first two blocks reuses exactly those.
    ids = prefix[:32] + [1, 2, 3] * 30
    ref, _ = kv.next_token_full(model, ids)
    got, _, n, _ = kv.next_token_cached(c, model, ids)
    assert n == 2
    assert float((ref - got).abs().max()) <= kv.LOGITS_ATOL


def test_wrong_kv_under_the_right_keys_is_caught_by_the_logits_check(kvstore, model):
    """The tolerance has teeth: KV computed for other tokens changes the logits far beyond it."""
    c = kvstore.client()
    spec = kv.kv_spec(model)
    prefix = list(range(100, 164))
    suffix = list(range(300, 316))
    keys = kv.block_keys(prefix, kv.cache_salt_for(model))
    with torch.no_grad():
        wrong = model(torch.tensor([list(range(200, 264))]), use_cache=True).past_key_values
    put_kv_blocks(c, keys, list(kv.cache_to_blocks(wrong, spec, len(keys))), spec)
    ref, _ = kv.next_token_full(model, prefix + suffix)
    got, _, n, _ = kv.next_token_cached(c, model, prefix + suffix)
    assert n == 4
    assert float((ref - got).abs().max()) > 10 * kv.LOGITS_ATOL
