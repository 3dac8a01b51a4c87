"""vLLM-style prefix-block keys that are identical in every process on every host.

Like vLLM's prefix cache, a block's key is a hash of (parent block's key, the
block's token ids, extra keys), chained from a root value, so equal token
prefixes give equal key chains. Unlike vLLM's default, the root is a fixed
constant and the encoding is our own canonical byte format hashed with
SHA-256: no Python hash(), no pickle, no per-process random seed.

Canonical encoding of one block (all integers little-endian):

    b"BLK1" | parent key (32 bytes) | u32 token count | i64 per token |
    u32 extra-key count | per extra key: type tag (1 byte) + u32 length + bytes

Type tags: b"s" str (UTF-8), b"b" bytes, b"i" int (signed 64-bit), b"n" None.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import InvalidKeyError

KEY_BYTES = 32
ROOT_KEY = hashlib.sha256(b"beluga prefix-cache root v1").digest()
"""Parent of every first block; fixed so keys match across processes and hosts."""

_U32 = struct.Struct("<I")


def check_key(key) -> bytes:
    """Return ``key`` as bytes if it is a 32-byte key, else raise InvalidKeyError."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidKeyError(f"key must be {KEY_BYTES} bytes, got {type(key).__name__}")
    b = bytes(key)
    if len(b) != KEY_BYTES:
        raise InvalidKeyError(f"key must be exactly {KEY_BYTES} bytes (a SHA-256 block hash), got {len(b)} bytes")
    return b


def _encode_extra(item) -> bytes:
    if item is None:
        return b"n" + _U32.pack(0)
    if isinstance(item, bool):  # bool is an int; keep it distinct and explicit
        item = int(item)
    if isinstance(item, int):
        return b"i" + _U32.pack(8) + struct.pack("<q", item)
    if isinstance(item, str):
        raw = item.encode("utf-8")
        return b"s" + _U32.pack(len(raw)) + raw
    if isinstance(item, (bytes, bytearray, memoryview)):
        raw = bytes(item)
        return b"b" + _U32.pack(len(raw)) + raw
    raise TypeError(f"extra key {item!r} must be str, bytes, int or None, not {type(item).__name__}")


def hash_block(parent: bytes, token_ids: Sequence[int], extra_keys: Iterable = ()) -> bytes:
    """Key of one block given its parent's key (ROOT_KEY for the first block)."""
    parent = check_key(parent)
    tokens = list(token_ids)
    extras = list(extra_keys)
    h = hashlib.sha256()
    h.update(b"BLK1")
    h.update(parent)
    h.update(_U32.pack(len(tokens)))
    try:
        h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    except struct.error as exc:
        raise TypeError(f"token ids must be 64-bit integers: {exc}") from None
    h.update(_U32.pack(len(extras)))
    for item in extras:
        h.update(_encode_extra(item))
    return h.digest()


@dataclass(frozen=True)
class PrefixContext:
    """What besides the tokens distinguishes cached KV: vLLM's extra keys.

    The model and LoRA go into every block (a block is only reusable under the
    same weights); the cache salt, as in vLLM, only into the first block, which
    already separates every descendant through the parent chain.
    """

    model: str | None = None
    lora: str | None = None
    cache_salt: str | None = None

    def extra_keys(self, block_index: int) -> tuple:
        extras: tuple = (self.model, self.lora)
        if block_index == 0:
            extras += (self.cache_salt,)
        return extras


def prefix_keys(
    token_ids: Sequence[int],
    *,
    block_tokens: int = 16,
    context: PrefixContext = PrefixContext(),
    parent: bytes = ROOT_KEY,
) -> list[bytes]:
    """Keys of every full block of ``token_ids`` (a trailing partial block has no key, as in vLLM)."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    keys: list[bytes] = []
    tokens = list(token_ids)
    for i in range(len(tokens) // block_tokens):
        parent = hash_block(parent, tokens[i * block_tokens : (i + 1) * block_tokens], context.extra_keys(i))
        keys.append(parent)
    return keys


def name_key(name: str) -> bytes:
    """A key for a human-chosen name (CLI debugging); never collides with block keys' encoding."""
    return hashlib.sha256(b"beluga name v1\0" + name.encode("utf-8")).digest()


def parse_key(text: str) -> bytes:
    """64 hex digits -> key, with a clear error otherwise."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidKeyError(f"key {text!r} is not hex (expected {2 * KEY_BYTES} hex digits)") from None
    return check_key(raw)
