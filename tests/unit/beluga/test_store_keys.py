"""Prefix-block keys: deterministic everywhere, chained like vLLM's prefix cache."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest

from beluga.errors import InvalidKeyError
from beluga.keys import (
    ROOT_KEY,
    PrefixContext,
    check_key,
    hash_block,
    name_key,
    parse_key,
    prefix_keys,
    vllm_block_hashes,
)

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


# ---------------------------------------------------------------- vLLM's own block hashes
# Computed by vLLM 0.33.0's own functions (vllm/v1/core/kv_cache_utils.py get_request_block_hasher,
# generate_block_hash_extra_keys, hash_block_tokens, init_none_hash; vllm/utils/hashing.py) with
# cbor2 6.3.0, through scripts/vllm_block_hash_vectors.py in a throwaway virtualenv. Key: (PYTHONHASHSEED
# or None when unset, algo). Cases, as VLLM_CASES below gives them.
VLLM_VECTORS = {
    (None, 'sha256'): {
        'plain': [
            '9d9c413731095d0ee811a14814414907cafccd751ce2052f659e8e1f547aeb68',
            '6eab5151ee783ec014728198ae09f5b0c20f18673ff098bcec4f29beb1e71e61',
            'caf3fc6b0a70cebaaae638e8451ab3a5afb03fba4ab9ed391dcf2e6ca4dadf06',
        ],
        'lora+salt': [
            'eab926e765dc6aeba630b650c9ea42af8936d0795103b0d3759d863cc466dc58',
            'dedede6eb9e41158e24dc1d88b42e253462410de0cf388675f2af4495d8f3cad',
            'b2eae02e6ad620b09b42aa09f91af943208e9e4e47bed6a0be3d3f95f63e499c',
        ],
        'small': [
            '1e1f6301314e5a350fa7996bf26b6d5600676be09a0e0e2b482fad4e7c47e722',
            '2d4d266e02ffc2ac86a156b1b65901ff0f17f52ea1e8ba7c773dab3ddb92b8a9',
        ],
        'mm+embeds': [
            '2dac717f087bc2c4c16b4b2d98c3a52f82fb2f7e4fe5c50cc76db5b1ad1ffedd',
            'b1b2fe03196b1be7d52dfd35804edffaf2f4052f1f56911642bb4b5c6bef2756',
        ],
    },
    (None, 'sha256_cbor'): {
        'plain': [
            '15528b726efb88cb4d9efc583657a821bceb1f67307c6e813417567050a24fdc',
            'b057b31190789434ae1b5f233801e9a318f5a49e9baf90762102e4d3c29c9005',
            '4556726f5ac9636556c58b01b840d90a19e6de63d7361b063fbfcc18764d8f2f',
        ],
        'lora+salt': [
            'c6bb25d50f86aec2e7898748d9ae4f0ea35f77dcf52cc6a685d68892c6f5dc89',
            'a1c8b14f503bfab45f493a9d4f6a5caa549ef2c1ff420ec29dcf8256eb27b6b7',
            '744f50e33094c989c6ecd6e1f072f9f3167e34a1b03b7ecc2613ab39a946cc38',
        ],
        'small': [
            '952b6ff979d4e9fe5dc57ec849ea65217dc7c8d654036b382cc1f54a90a347e1',
            '04d8de9d65a7369f11d117bde3643d361fb110f2b26ebbc3b38e117d6d338e37',
        ],
        'mm+embeds': [
            '6a177ae456b65fc86eb8b423c5c3e719bbfae85db530075398c2e0bc2db5b8ff',
            'e986c8a10d22b38edd61b4487655fac8510243b6bab6751d37e9fedcf87f1d7a',
        ],
    },
    ('0', 'sha256'): {
        'plain': [
            '754160d569fbeb0e17f9979e900903dcf2d2313dc721c02de978b60cbf798ad6',
            '97cf935fa8f84a6e1185b6a906e9b4560d2b8223dd3f84ea88ba69d48980004b',
            '0a7c2f230a6acfbe43401d69d08c7645b63928714a204e2ca1a0b0fd00a1a416',
        ],
        'lora+salt': [
            'a163a7fb8562ab596f075600942dabb70e17991cb3f206c269ed0bdd6a20ca3a',
            '2351e18b5e7231d3a25bd88647445fa8a94d5d039828446c111fbca6aa1fdaf5',
            '87e4da2b63663516494a9657e96e3fcb841fa2dab27baf56501c2a7a36674f66',
        ],
        'small': [
            'e4d11cfd7b7f3f5b97c0ef054931729eb5e6e02f301c78397688138200b8552c',
            '0efb91c4325a4712d66c31345b8e55b39bacc6cbfa2b7f392ca46be78eb57ee0',
        ],
        'mm+embeds': [
            '7839657d5cabb18d9dbc24c805506fc0572e5b02dbde35547db5c4a5d30abc44',
            '2702ba2e8642bc498ec2a894914fbe19ff66a5b0033a914f46a0951ecb73047b',
        ],
    },
    ('0', 'sha256_cbor'): {
        'plain': [
            '749fdc796f99efd836e0126282116392f5a5e4ea5c7ed009f2f58c385525a1f5',
            '2d5697df551c58c422455b94c9c0db1ddfc2a375c20b0014c82e2a1e69c1d12a',
            '9bc8fffb32c004317d2644e9bb8aea87ba79800dcae35b235e6a96ce6a96239b',
        ],
        'lora+salt': [
            '41b70101af77e1735ad98fd7d1e1f3fc8acaaa3dfddfea7644ecd2a83d46c9ce',
            'a516707c37582ffe884936d80956e139d41c573d938a38258926811cb8370d7c',
            '134ad1b0320c53c63e237c296ede186af39fcd9fe0611621ed8f24e480e4d315',
        ],
        'small': [
            'ed91a0d69b57582a0522bfa2a4924ad837403d9d848b205ee8543a1b53dfb55b',
            '81b3aaa34bea8afeb89216c8101b33d3424b0123e7845299abe9ca3a3383c5c4',
        ],
        'mm+embeds': [
            'd108663a5423c7a1ff9ba54078f0dd93d8ce34e8bc40f8d2704c85a67cda4429',
            'a43c60f1fec9e54545fad3335be33bca361412b38e85d878595ec75d9de51446',
        ],
    },
}

VLLM_TOKENS = list(range(1000, 1000 + 16 * 3 + 5))  # three full blocks of 16 and a partial one
VLLM_SMALL = [7, 0, 2**31 + 5, 65535, 1, 42, 3, 9, 9]  # two full blocks of 4 and a partial one
_LORA = ("lora", "sql-adapter", "/adapters/sql")
VLLM_CASES = {
    # a plain request: no extra keys
    "plain": (VLLM_TOKENS, 16, None),
    # a LoRA request with a cache salt, extra keys exactly as vLLM's request hasher generated them
    "lora+salt": (VLLM_TOKENS, 16, [(_LORA, ("cache_salt", "tenant-7")), (_LORA,), (_LORA,)]),
    # block_size 4, a salted request (salt in the first block only), a token id past 2**31
    "small": (VLLM_SMALL, 4, [(("cache_salt", "s"),), None]),
    # multimodal and prompt-embeds shaped keys (an int offset, bytes) through hash_block_tokens
    "mm+embeds": (VLLM_SMALL, 4, [(("mm", "img-hash-1", 3), ("prompt_embeds", b"\x00\xffemb")), None]),
}


@pytest.mark.parametrize("seed,algo", list(VLLM_VECTORS))
@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_vllm_block_hashes_are_the_ones_vllm_computes(monkeypatch, seed, algo, case):
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)  # vLLM's default seed "vllm-none-hash"
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    tokens, block_size, extra = VLLM_CASES[case]
    got = vllm_block_hashes(tokens, block_size=block_size, algo=algo, extra_keys=extra)
    assert [h.hex() for h in got] == VLLM_VECTORS[(seed, algo)][case]
    assert all(len(check_key(h)) == 32 for h in got)  # usable as store keys as they are


def test_vllm_block_hashes_default_algo_and_block_size(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert [h.hex() for h in vllm_block_hashes(VLLM_TOKENS)] == VLLM_VECTORS[(None, "sha256_cbor")]["plain"]


def test_vllm_block_hashes_follow_the_seed_in_a_process_started_with_it():
    """PYTHONHASHSEED as vLLM reads it: from the environment the engine process was started with."""
    code = ("import json; from beluga.keys import vllm_block_hashes;"
            f"print(json.dumps([h.hex() for h in vllm_block_hashes({VLLM_TOKENS!r}, algo='sha256')]))")
    for seed in (None, "0"):
        env = subprocess_env()
        env.pop("PYTHONHASHSEED", None)
        if seed is not None:
            env["PYTHONHASHSEED"] = seed
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == VLLM_VECTORS[(seed, "sha256")]["plain"]


def test_vllm_block_hashes_chain_and_skip_the_partial_block(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    full = vllm_block_hashes(VLLM_TOKENS)
    assert len(full) == 3 and vllm_block_hashes(VLLM_TOKENS[:48]) == full  # the 5 trailing tokens: no hash
    assert vllm_block_hashes(VLLM_TOKENS[:47]) == full[:2] and vllm_block_hashes(VLLM_TOKENS[:15]) == []
    import numpy as np

    assert vllm_block_hashes(np.array(VLLM_TOKENS, dtype=np.int64)) == full  # numpy ints hash as Python ints
    # An entry for the partial block is accepted and unused.
    _, _, extra = VLLM_CASES["lora+salt"]
    assert vllm_block_hashes(VLLM_TOKENS, extra_keys=extra + [(_LORA,)]) == vllm_block_hashes(
        VLLM_TOKENS, extra_keys=extra)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(algo="xxhash"), ValueError, "algo must be one of sha256, sha256_cbor"),
    (dict(block_size=0), ValueError, "block_size must be a positive int"),
    (dict(extra_keys=[None]), ValueError, r"extra_keys has 1 entries for 53 tokens in 3 full blocks of 16: .*\(3 or 4\)"),
    (dict(extra_keys=[None] * 5), ValueError, "extra_keys has 5 entries"),
    (dict(extra_keys=[["lora", "a", "b"], None, None]), TypeError, r"extra_keys\[0\] must be a tuple or None, got list.*use a tuple"),
    (dict(extra_keys=[(["lora", "a", "b"],), None, None]), TypeError, r"extra_keys\[0\]\[0\] is a list.*use a tuple"),
    (dict(extra_keys=[(("lora", 1.5),), None, None]), TypeError, r"extra_keys\[0\]\[0\]\[1\] is a float"),
])
def test_vllm_block_hashes_refuse_what_vllm_would_never_match(kwargs, error, match):
    with pytest.raises(error, match=match):
        vllm_block_hashes(VLLM_TOKENS, **kwargs)
    with pytest.raises(TypeError, match="token ids must be integers"):
        vllm_block_hashes([1.0] * 16)
