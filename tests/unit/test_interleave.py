"""The interleave arithmetic that verification and `pool` rely on."""
from pathlib import Path

from testbed import topology as T
from testbed.provision import locate, sample_offsets


def files(t):
    return {d.id: Path(f"/p/{d.id}.raw") for d in t.devices}


def test_4way_locations():
    t = T.load("4hosts-1switch")
    f = files(t)
    assert locate(t, f, 0).device == "mem0"
    loc = locate(t, f, 3 * 4096 + 10)
    assert (loc.position, loc.device, loc.file_offset) == (3, "mem3", 10)
    loc = locate(t, f, 16384 + 4096 + 7)  # second stripe, position 1
    assert (loc.device, loc.serial, loc.file_offset, loc.file) == ("mem1", 0x1001, 4096 + 7, Path("/p/mem1.raw"))


def test_cross_host_bridge_order():
    t = T.load("2hosts-2switches")
    f = files(t)
    # Positions alternate host bridges: mem0 (hb0), mem2 (hb1), mem1 (hb0), mem3 (hb1).
    assert [locate(t, f, i * 4096).device for i in range(4)] == ["mem0", "mem2", "mem1", "mem3"]
    assert [t.host_bridge_of(locate(t, f, i * 4096).device) for i in range(4)] == ["hb0", "hb1", "hb0", "hb1"]


def test_samples_cover_every_target_and_whole_pool():
    for name in T.builtin_names():
        t = T.load(name)
        offs = sample_offsets(t)
        positions = {locate(t, files(t), o).position for o in offs}
        assert positions == set(range(len(t.pool.devices)))
        assert max(offs) >= t.pool_size_bytes - t.pool.granularity_bytes * len(t.pool.devices)
        assert all(o + 64 <= t.pool_size_bytes for o in offs)


def test_every_byte_maps_to_exactly_one_place():
    t = T.load("4hosts-1switch")
    f = files(t)
    g = t.pool.granularity_bytes
    seen = set()
    for o in range(0, 8 * 4 * g, g // 2):
        loc = locate(t, f, o)
        key = (loc.device, loc.file_offset)
        assert key not in seen
        seen.add(key)
