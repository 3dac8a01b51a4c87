"""torch API for KV blocks: (layers, 2, block_tokens, kv_heads, head_dim) tensors.

The only module that imports torch, and only when called: guests have no torch.
A put copies the tensor's bytes straight into pool memory (one memcpy, no
serialization); a get copies straight from pool memory into the caller's
tensor; ``view_kv_block`` gives a tensor that *is* pool memory (zero-copy),
valid while its lease is held.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from .client import BelugaClient

_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "float8_e4m3fn", "float8_e5m2")


def _torch():
    import torch  # noqa: PLC0415 - deliberately lazy

    return torch


@dataclass(frozen=True)
class KVBlockSpec:
    """Shape and dtype of one KV block of a model (vLLM: 16 tokens per block)."""

    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int = 16
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {_DTYPES}")
        for name in ("layers", "kv_heads", "head_dim", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.block_tokens, self.kv_heads, self.head_dim)

    @property
    def torch_dtype(self):
        return getattr(_torch(), self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _torch().empty((), dtype=self.torch_dtype).element_size()

    def empty(self):
        return _torch().empty(self.shape, dtype=self.torch_dtype)


def _as_bytes(t, what: str):
    """A uint8 numpy view of a CPU tensor's storage (no copy)."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what} is on {t.device}; pool memory is host memory, move it to the CPU first")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() first)")
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _check_shape(t, spec: KVBlockSpec | None, what: str) -> None:
    if not isinstance(t, _torch().Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if spec is not None and (tuple(t.shape) != spec.shape or t.dtype != spec.torch_dtype):
        raise ValueError(f"{what} has shape {tuple(t.shape)} dtype {t.dtype}, expected {spec.shape} {spec.torch_dtype}")
    if t.dim() != 5 or t.shape[1] != 2:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected (layers, 2, block_tokens, kv_heads, head_dim)")


def put_kv_block(client: BelugaClient, key: bytes, block, spec: KVBlockSpec | None = None) -> None:
    put_kv_blocks(client, [key], [block], spec)


def put_kv_blocks(client: BelugaClient, keys: Sequence[bytes], blocks: Sequence, spec: KVBlockSpec | None = None) -> None:
    if len(keys) != len(blocks):
        raise ValueError(f"{len(keys)} keys but {len(blocks)} blocks")
    items = []
    for i, (k, t) in enumerate(zip(keys, blocks)):
        _check_shape(t, spec, f"block {i}")
        items.append((k, _as_bytes(t, f"block {i}")))
    client.put_many(items)


def get_kv_block(client: BelugaClient, key: bytes, out) -> bool:
    """Copy the block straight from pool memory into ``out``; False on a miss."""
    _check_shape(out, None, "out")
    dest = _as_bytes(out, "out")
    n = client.get_into(key, dest)
    if n is None:
        return False
    if n != dest.nbytes:
        raise ValueError(f"stored block for key {key.hex()[:16]}... has {n} bytes, but out has {dest.nbytes}: "
                         f"the tensor shape or dtype does not match what was put")
    return True


def get_kv_blocks(client: BelugaClient, keys: Sequence[bytes], outs: Sequence) -> list[bool]:
    """Copy several blocks straight into their tensors with one lookup round trip; False for each miss."""
    if len(keys) != len(outs):
        raise ValueError(f"{len(keys)} keys but {len(outs)} output tensors")
    dests = []
    for i, out in enumerate(outs):
        _check_shape(out, None, f"out {i}")
        dests.append(_as_bytes(out, f"out {i}"))
    got = client.get_many_into(keys, dests)
    for key, n, dest in zip(keys, got, dests):
        if n is not None and n != dest.nbytes:
            raise ValueError(f"stored block for key {bytes(key).hex()[:16]}... has {n} bytes, but out has "
                             f"{dest.nbytes}: the tensor shape or dtype does not match what was put")
    return [n is not None for n in got]


@contextlib.contextmanager
def view_kv_block(client: BelugaClient, key: bytes, spec: KVBlockSpec) -> Iterator:
    """Zero-copy: yields a tensor backed by pool memory (None on a miss); the lease ends on exit.

    The tensor must not be written, nor used after the ``with`` block.
    """
    torch = _torch()
    view = client.view(key)
    if view is None:
        yield None
        return
    try:
        if view.data.nbytes != spec.nbytes:
            raise ValueError(f"stored block for key {key.hex()[:16]}... has {view.data.nbytes} bytes, "
                             f"spec {spec.shape} {spec.dtype} needs {spec.nbytes}")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is writable memory it does not own
            t = torch.frombuffer(view.data, dtype=torch.uint8)
        yield t.view(spec.torch_dtype).reshape(spec.shape)
        del t
    finally:
        view.release()
