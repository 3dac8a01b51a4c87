#!/usr/bin/env python3
"""Print the vLLM block-hash test vectors of tests/unit/beluga/test_store_keys.py.

The vectors come from vLLM's own functions, not from beluga: vLLM's wheel is
CUDA-only and cannot be imported here, so this loads ``vllm/utils/hashing.py``
as a module and, from ``vllm/v1/core/kv_cache_utils.py``, executes only the
top-level statements that block hashing needs (the NONE_HASH seed, the
extra-key generators, ``hash_block_tokens`` and ``get_request_block_hasher``),
picked out by name with ``ast``. A request is a stand-in object with the
attributes those functions read.

Run it in a throwaway virtualenv that has cbor2, pointing at an unpacked wheel:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install cbor2
    pip download --no-deps -d /tmp/vllm-dl vllm==0.33.0
    unzip -q /tmp/vllm-dl/vllm-*.whl 'vllm/*' -d /tmp/vllm-src
    /tmp/vllm-venv/bin/python scripts/vllm_block_hash_vectors.py /tmp/vllm-src
"""
from __future__ import annotations

import ast
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

WANTED = {
    "BlockHash", "DEFAULT_NONE_HASH_SEED", "_NON_CRYPTO_HASH_FUNCTIONS", "_NONE_HASH_SEED",
    "resolve_none_hash_seed", "init_none_hash", "hash_block_tokens", "_gen_mm_extra_hash_keys",
    "_gen_lora_extra_hash_keys", "_gen_prompt_embeds_extra_hash_keys", "generate_block_hash_extra_keys",
    "get_request_block_hasher",
}


def load_vllm(src: Path):
    spec = importlib.util.spec_from_file_location("vllm_hashing", src / "vllm/utils/hashing.py")
    hashing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hashing)
    tree = ast.parse((src / "vllm/v1/core/kv_cache_utils.py").read_text())
    body = []
    for node in tree.body:
        names = set()
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = {node.name}
        elif isinstance(node, ast.Assign):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = {node.target.id}
        if names & WANTED:
            body.append(node)
    missing = WANTED - {n for node in body for n in (
        [node.name] if hasattr(node, "name") else
        [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)])}
    if missing:
        sys.exit(f"not found in kv_cache_utils.py: {sorted(missing)}")
    import typing
    from collections.abc import Callable, Sequence

    ns = {"os": os, "hashlib": __import__("hashlib"), "Any": typing.Any, "Callable": Callable,
          "Sequence": Sequence, "NewType": typing.NewType, "Request": object,
          "logger": logging.getLogger("vllm"), "xxhash": hashing.xxhash, "xxhash_cbor": hashing.xxhash_cbor}
    exec(compile(ast.Module(body=body, type_ignores=[]), "kv_cache_utils.py", "exec"), ns)
    return hashing, ns


def request(tokens, *, lora=None, cache_salt=None):
    return types.SimpleNamespace(
        block_hashes=[], num_tokens=len(tokens), all_token_ids=list(tokens), mm_features=[],
        lora_request=None if lora is None else types.SimpleNamespace(lora_name=lora[0], lora_path=lora[1]),
        cache_salt=cache_salt, prompt_embeds=None)


def main() -> None:
    hashing, ns = load_vllm(Path(sys.argv[1]))
    tokens = list(range(1000, 1000 + 16 * 3 + 5))  # three full blocks and a partial one
    small = [7, 0, 2**31 + 5, 65535, 1, 42, 3, 9, 9]  # block_size 4: two full blocks
    lora = ("sql-adapter", "/adapters/sql")
    for seed in (None, "0", "1234"):
        if seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = seed
        for algo in ("sha256", "sha256_cbor"):
            fn = hashing.get_hash_fn_by_name(algo)
            ns["init_none_hash"](fn)
            print(f"# PYTHONHASHSEED={seed!r} algo={algo!r} NONE_HASH={ns['NONE_HASH'].hex()}")
            cases = {
                "plain": (tokens, 16, request(tokens)),
                "lora+salt": (tokens, 16, request(tokens, lora=lora, cache_salt="tenant-7")),
                "small": (small, 4, request(small, cache_salt="s")),
            }
            for name, (toks, bs, req) in cases.items():
                hashes = ns["get_request_block_hasher"](bs, fn)(req)
                extras = [ns["generate_block_hash_extra_keys"](req, i * bs, (i + 1) * bs, 0)[0]
                          for i in range(len(toks) // bs)]
                print(f"{name}: extra_keys={extras!r}")
                print(f"{name}: {[h.hex() for h in hashes]!r}")
            # Extra keys of other kinds, through hash_block_tokens itself: bytes and ints inside.
            extras = [(("mm", "img-hash-1", 3), ("prompt_embeds", b"\x00\xffemb")), None]
            parent, out = None, []
            for i, ek in enumerate(extras):
                parent = ns["hash_block_tokens"](fn, parent, small[i * 4 : (i + 1) * 4], ek)
                out.append(parent.hex())
            print(f"mm+embeds: extra_keys={extras!r}")
            print(f"mm+embeds: {out!r}")


if __name__ == "__main__":
    main()
