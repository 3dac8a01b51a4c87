"""Beluga: a KV-cache store on a shared (CXL) memory pool. Imports nothing from testbed.

Public API (imported lazily, so `import beluga` stays cheap and torch-free):

    BelugaClient, ClientStats, StoreStats     beluga.client
    MetadataService, ServiceConfig            beluga.service
    Pool, format_pool                         beluga.pool
    prefix_keys, hash_block, PrefixContext    beluga.keys
    vllm_block_hashes                         beluga.keys (vLLM's own block hashes)
    KVBlockSpec, put_kv_block, get_kv_block   beluga.tensor (needs torch)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BelugaClient": "client", "ClientStats": "client", "StoreStats": "client",
    "MetadataService": "service", "ServiceConfig": "service",
    "Pool": "pool", "format_pool": "pool",
    "prefix_keys": "keys", "hash_block": "keys", "PrefixContext": "keys", "ROOT_KEY": "keys",
    "vllm_block_hashes": "keys",
    "KVBlockSpec": "tensor", "put_kv_block": "tensor", "get_kv_block": "tensor", "view_kv_block": "tensor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'beluga' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
