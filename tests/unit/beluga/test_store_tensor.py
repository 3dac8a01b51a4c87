"""torch KV-block API: straight into and out of pool memory."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from beluga.keys import prefix_keys  # noqa: E402
from beluga.tensor import KVBlockSpec, get_kv_block, get_kv_blocks, put_kv_block, put_kv_blocks, view_kv_block  # noqa: E402

SPEC = KVBlockSpec(layers=4, kv_heads=2, head_dim=32, block_tokens=16, dtype="float16")


def test_spec():
    assert SPEC.shape == (4, 2, 16, 2, 32)
    assert SPEC.nbytes == 4 * 2 * 16 * 2 * 32 * 2
    with pytest.raises(ValueError, match="dtype"):
        KVBlockSpec(1, 1, 1, dtype="complex64")
    with pytest.raises(ValueError, match="layers must be >= 1"):
        KVBlockSpec(0, 1, 1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_put_get_roundtrip(store, dtype):
    c = store.client()
    spec = KVBlockSpec(layers=3, kv_heads=2, head_dim=16, dtype=dtype)
    keys = prefix_keys(list(range(48)))
    blocks = [torch.randn(spec.shape).to(spec.torch_dtype) for _ in keys]
    put_kv_block(c, keys[0], blocks[0], spec)
    put_kv_blocks(c, keys[1:], blocks[1:], spec)
    outs = [spec.empty() for _ in keys]
    assert get_kv_blocks(c, keys, outs) == [True, True, True]
    for a, b in zip(blocks, outs):
        assert torch.equal(a, b)
    assert get_kv_block(c, prefix_keys(list(range(100, 116)))[0], spec.empty()) is False


def test_zero_copy_view_is_pool_memory(store):
    c = store.client()
    key = prefix_keys(list(range(16)))[0]
    block = torch.randn(SPEC.shape).half()
    put_kv_block(c, key, block, SPEC)
    with view_kv_block(c, key, SPEC) as t:
        assert t.shape == SPEC.shape and t.dtype == torch.float16
        assert torch.equal(t, block)
        loc = c._lookup([key], 0)[0]
        import numpy as np

        base = np.frombuffer(store.pool.buf, dtype=np.uint8).__array_interface__["data"][0]
        assert t.data_ptr() - base == loc.data_offset  # the tensor *is* the pool's bytes
        assert store.service.stats()["leases"] == 1
    c.flush_releases()
    assert store.service.stats()["leases"] == 0
    with view_kv_block(c, prefix_keys(list(range(50, 66)))[0], SPEC) as missing:
        assert missing is None


def test_shape_and_device_errors(store):
    c = store.client()
    key = prefix_keys(list(range(16)))[0]
    with pytest.raises(ValueError, match="expected \\(layers, 2"):
        put_kv_block(c, key, torch.zeros(4, 3, 16, 2, 32))
    with pytest.raises(ValueError, match="expected"):
        put_kv_block(c, key, torch.zeros(SPEC.shape), SPEC)  # float32 vs float16
    with pytest.raises(ValueError, match="contiguous"):
        put_kv_block(c, key, torch.zeros(32, 2, 16, 2, 4).half().transpose(0, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        put_kv_block(c, key, b"bytes")
    put_kv_block(c, key, torch.zeros(SPEC.shape).half(), SPEC)
    with pytest.raises(ValueError, match="only"):
        get_kv_block(c, key, torch.zeros(2, 2, 16, 2, 32).half())  # too small for what was put
    with pytest.raises(ValueError, match="does not match"):
        get_kv_block(c, key, torch.zeros(8, 2, 16, 2, 32).half())
    with pytest.raises(ValueError, match="needs"):
        with view_kv_block(c, key, KVBlockSpec(layers=2, kv_heads=2, head_dim=32)):
            pass
