"""Who keeps a segment: a writer keeps the segments it fills, and an emptied one goes back to the pool.

A full segment stays its writer's (no seal at COMMIT, no takeover at the next ALLOC): a put
that replaces a block writes no segment-table entry. A segment left with no block, whoever
held it, is free again, so that a block of another size class gets it before any live
block is evicted for space.
"""
from __future__ import annotations

from beluga.keys import name_key

KiB = 1024
X = 64 * KiB  # 4 blocks per 256 KiB segment of the test pool
Y = 128 * KiB  # another size class: 2 per segment


def k(name) -> bytes:
    return name_key(f"seg-{name}")


def segments(store) -> dict:
    return store.service.stats()["segments"]


def where(store, key: bytes) -> int:
    """The segment holding ``key``'s committed copy."""
    return store.service.blocks.index[key][0]


def test_a_writer_keeps_its_full_segment_and_puts_into_the_slot_a_replacement_freed(store):
    c = store.client()
    per_segment = store.pool.geometry.slot_layout(X).slot_count
    for i in range(per_segment):
        c.put(k(i), bytes([i]) * X)
    first = where(store, k(0))
    assert {where(store, k(i)) for i in range(per_segment)} == {first}
    assert segments(store)["open"] == 1 and segments(store)["sealed"] == 0, "full, and still the writer's"
    c.put(k(0), b"\xee" * X)  # the new copy goes to a new segment; its old slot is freed
    assert where(store, k(0)) != first and segments(store)["open"] == 2
    c.put(k("new"), b"\xdd" * X)
    assert where(store, k("new")) == first, "the writer's next put takes the slot freed in its own segment"
    assert segments(store)["open"] == 2 and segments(store)["sealed"] == 0
    assert c.get(k(0)) == b"\xee" * X and c.get(k("new")) == b"\xdd" * X
    assert [c.get(k(i)) for i in range(1, per_segment)] == [bytes([i]) * X for i in range(1, per_segment)]
    assert store.service.counters["evictions"] == 0
    store.service.check_invariants()


def test_a_segment_its_writer_emptied_is_free_for_another_class_before_any_block_is_evicted(store):
    c = store.client()
    ys = [k(f"y{i}") for i in range(2 * store.pool.geometry.slot_layout(Y).slot_count)]  # two full Y segments
    for i, key in enumerate(ys):
        c.put(key, bytes([i]) * Y)
    xs = []
    while store.service.stats()["slots_free"] or store.service._free_segments:  # the rest: X blocks
        xs.append(k(f"x{len(xs)}"))
        c.put(xs[-1], bytes([len(xs) % 256]) * X)
    assert store.service.counters["evictions"] == 0 and segments(store)["free"] == 0
    emptied = where(store, xs[0])
    in_it = [key for key in xs if where(store, key) == emptied]
    for key in in_it:  # the writer's own full segment, emptied by deletes
        assert c.delete(key)
    assert segments(store)["free"] == 1, "an empty segment is free, not kept open by its writer"
    other = store.client()
    other.put(k("late y"), b"\xcc" * Y)  # Y's segments are full: it needs a whole segment
    assert store.service.counters["evictions"] == 0, "a live block was evicted while a segment stood empty"
    assert where(store, k("late y")) == emptied
    assert [c.get(key) for key in ys] == [bytes([i]) * Y for i in range(len(ys))]
    kept = [key for key in xs if key not in in_it]
    assert all(c.get(key) is not None for key in kept)
    store.service.check_invariants()
