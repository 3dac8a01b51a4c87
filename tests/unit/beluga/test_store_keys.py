"""Prefix-block keys: deterministic everywhere, chained like vLLM's prefix cache."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest

from beluga.errors import InvalidKeyError
from beluga.keys import ROOT_KEY, PrefixContext, check_key, hash_block, name_key, parse_key, prefix_keys

from beluga_store_support import subprocess_env

TOKENS = list(range(1000, 1000 + 16 * 5 + 7))  # 5 full blocks and a partial one


def test_same_prefix_same_keys_in_other_processes_with_other_hash_seeds():
    ctx = dict(model="llama-3-8b", lora="adapter-a", cache_salt="tenant-1")
    mine = [k.hex() for k in prefix_keys(TOKENS, context=PrefixContext(**ctx))]
    code = (
        "import json,sys; from beluga.keys import prefix_keys, PrefixContext;"
        f"print(json.dumps([k.hex() for k in prefix_keys({TOKENS!r}, context=PrefixContext(**{ctx!r}))]))"
    )
    for seed in ("0", "1", "random"):
        env = subprocess_env()
        env["PYTHONHASHSEED"] = seed
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == mine


def test_keys_follow_the_documented_encoding():
    """Re-derive the first two keys from the encoding described in beluga/keys.py and docs/store.md."""

    def block(parent: bytes, toks, extras) -> bytes:
        h = hashlib.sha256(b"BLK1" + parent + struct.pack("<I", len(toks)) + struct.pack(f"<{len(toks)}q", *toks))
        h.update(struct.pack("<I", len(extras)))
        for e in extras:
            if e is None:
                h.update(b"n" + struct.pack("<I", 0))
            else:
                raw = e.encode()
                h.update(b"s" + struct.pack("<I", len(raw)) + raw)
        return h.digest()

    assert ROOT_KEY == hashlib.sha256(b"beluga prefix-cache root v1").digest()
    k0 = block(ROOT_KEY, TOKENS[:16], ["m", None, "salt"])
    k1 = block(k0, TOKENS[16:32], ["m", None])
    assert prefix_keys(TOKENS[:32], context=PrefixContext(model="m", cache_salt="salt")) == [k0, k1]


def test_chain_properties():
    keys = prefix_keys(TOKENS)
    assert len(keys) == 5  # the partial block has no key
    assert len(set(keys)) == 5 and all(len(k) == 32 for k in keys)
    assert prefix_keys(TOKENS[:48]) == keys[:3]  # a prefix gives a prefix of the keys
    changed = list(TOKENS)
    changed[40] += 1  # inside block 2
    other = prefix_keys(changed)
    assert other[:2] == keys[:2] and all(a != b for a, b in zip(other[2:], keys[2:]))
    ctx = PrefixContext()
    assert hash_block(ROOT_KEY, TOKENS[:16], ctx.extra_keys(0)) == keys[0]
    assert hash_block(keys[0], TOKENS[16:32], ctx.extra_keys(1)) == keys[1]
    assert hash_block(ROOT_KEY, TOKENS[:16]) != keys[0]  # extra keys are part of the hash


@pytest.mark.parametrize("ctx", [PrefixContext(model="a"), PrefixContext(lora="l"), PrefixContext(cache_salt="s")])
def test_extra_keys_separate_caches(ctx):
    plain = prefix_keys(TOKENS)
    other = prefix_keys(TOKENS, context=ctx)
    # Salt is only in block 0, but the parent chain carries it to every block.
    assert all(a != b for a, b in zip(plain, other))


def test_extra_key_types_are_distinct():
    base = hash_block(ROOT_KEY, [1, 2])
    variants = {hash_block(ROOT_KEY, [1, 2], [x]) for x in (1, "1", b"1", None, True)}
    assert len(variants) == 4  # True is encoded as the int 1 on purpose
    assert base not in variants
    with pytest.raises(TypeError, match="extra key"):
        hash_block(ROOT_KEY, [1], [1.5])
    with pytest.raises(TypeError, match="64-bit"):
        hash_block(ROOT_KEY, [2**70])


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, b"x" * 64, "a" * 32, 123])
def test_keys_of_the_wrong_size_are_refused(bad):
    with pytest.raises(InvalidKeyError, match="32 bytes"):
        check_key(bad)


def test_parse_key_and_name_key():
    k = name_key("hello")
    assert parse_key(k.hex()) == k
    assert name_key("hello") != name_key("hello ")
    with pytest.raises(InvalidKeyError, match="not hex"):
        parse_key("zz" * 32)
    with pytest.raises(InvalidKeyError, match="exactly 32 bytes"):
        parse_key("ab" * 16)
    with pytest.raises(ValueError, match="block_tokens"):
        prefix_keys(TOKENS, block_tokens=0)
