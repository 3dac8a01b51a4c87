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

``vllm_block_hashes`` gives vLLM's own block hashes instead (see its docstring),
for a pool that a vLLM engine fills and reads under the keys it computes itself.
"""
from __future__ import annotations

import hashlib
import operator
import os
import pickle
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


VLLM_DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
"""The string vLLM 0.33 derives its root block hash from when PYTHONHASHSEED is not set (sha256 algorithms)."""

VLLM_HASH_ALGOS = ("sha256", "sha256_cbor")


def _vllm_hash_fn(algo: str):
    """vLLM's ``sha256`` (pickle) or ``sha256_cbor`` (canonical CBOR): object -> 32-byte SHA-256 digest."""
    if algo == "sha256":
        return lambda obj: hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    if algo == "sha256_cbor":
        try:
            import cbor2
        except ImportError:
            raise ImportError('algo="sha256_cbor" needs cbor2 (pip install cbor2; it is a dependency of '
                              'beluga-testbed), or use algo="sha256"') from None
        return lambda obj: hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()
    raise ValueError(f"algo must be one of {', '.join(VLLM_HASH_ALGOS)} (vLLM's reproducible block hashes), "
                     f"got {algo!r}")


_LIST_HINT = " (vLLM's extra keys are tuples, and pickle tells a list from a tuple: use a tuple)"


def _check_vllm_extra(value, where: str) -> None:
    """Refuse what vLLM never puts in extra keys: such keys could never match the keys vLLM computes."""
    if value is None or isinstance(value, (str, bytes, int)):
        return
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_vllm_extra(item, f"{where}[{i}]")
        return
    raise TypeError(f"extra_keys{where} is a {type(value).__name__}; vLLM's extra keys hold tuples, str, bytes, "
                    f"int and None" + (_LIST_HINT if isinstance(value, list) else ""))


def vllm_block_hashes(
    token_ids: Sequence[int],
    *,
    block_size: int = 16,
    algo: str = "sha256_cbor",
    extra_keys: Sequence[tuple | None] | None = None,
) -> list[bytes]:
    """The prefix-cache block hashes vLLM 0.33 computes for ``token_ids``: one 32-byte hash per full block.

    As vLLM's request block hasher does: the root ("NONE_HASH") is the hash of
    the PYTHONHASHSEED string when that variable is set (even to ""), else of
    ``VLLM_DEFAULT_NONE_HASH_SEED``; block ``i``'s hash is the hash of the
    3-tuple (parent hash, tuple of the block's token ids, the block's extra
    keys or None), its parent being block ``i - 1`` or the root. ``algo``
    picks the serialisation: "sha256" pickles (highest protocol), "sha256_cbor"
    (vLLM's choice for hashes shared across processes) writes canonical CBOR.
    A trailing partial block has no hash.

    ``extra_keys`` is None (no block has any) or one entry per full block (an
    entry for a trailing partial block is allowed and unused), each None or a
    tuple as vLLM makes it, for example ``(("lora", name, path), ("cache_salt",
    salt))`` for the first block of a salted LoRA request and ``(("lora", name,
    path),)`` for the others. vLLM passes None, never an empty tuple, for a
    block without extra keys.

    These are vLLM's BlockHash values; its prefix cache appends a 4-byte group
    id to them (BlockHashWithGroupId), which is not part of these keys.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    hash_fn = _vllm_hash_fn(algo)
    try:
        tokens = [operator.index(t) for t in token_ids]  # numpy ints pickle unlike vLLM's Python ints
    except TypeError as exc:
        raise TypeError(f"token ids must be integers: {exc}") from None
    full = len(tokens) // block_size
    if extra_keys is None:
        extras: list = [None] * full
    else:
        extras = list(extra_keys)
        blocks = -(-len(tokens) // block_size)
        if not full <= len(extras) <= blocks:
            want = f"{full}" if full == blocks else f"{full} or {blocks}"
            raise ValueError(f"extra_keys has {len(extras)} entries for {len(tokens)} tokens in {full} full blocks "
                             f"of {block_size}: give one entry (a tuple or None) per block ({want})")
        for i, e in enumerate(extras[:full]):
            if e is not None and not isinstance(e, tuple):
                raise TypeError(f"extra_keys[{i}] must be a tuple or None, got {type(e).__name__}"
                                + (_LIST_HINT if isinstance(e, list) else ""))
            _check_vllm_extra(e, f"[{i}]")
    seed = os.environ.get("PYTHONHASHSEED")
    parent = hash_fn(VLLM_DEFAULT_NONE_HASH_SEED if seed is None else seed)
    out: list[bytes] = []
    for i in range(full):
        parent = hash_fn((parent, tuple(tokens[i * block_size : (i + 1) * block_size]), extras[i]))
        out.append(parent)
    return out


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
