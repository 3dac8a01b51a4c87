"""Property test: random put/get/delete/evict/hold/restart sequences against a simple model.

The model is an LRU dictionary with a fixed number of slots, readers' holds
(leases) that pin slots, and deleted-but-held slots that stay occupied until
released. After every step the store must agree with the model exactly: same
hits with the same bytes, same evictions, same "pool full" refusals, and no
leaked slot.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from beluga.errors import PoolFullError
from beluga.keys import name_key
from beluga.layout import KiB
from beluga.service import ServiceConfig

from beluga_store_support import LocalStore

KEYS = [name_key(f"prop-{i}") for i in range(24)]
key_st = st.integers(min_value=0, max_value=len(KEYS) - 1).map(lambda i: KEYS[i])
data_st = st.binary(min_size=0, max_size=4096)  # one slot size class: LRU is exact


class Model:
    def __init__(self, capacity: int, on_event=lambda name: None) -> None:
        self.capacity = capacity
        self.on_event = on_event
        self.live: "OrderedDict[bytes, tuple[bytes, int, int]]" = OrderedDict()  # key -> (data, slot, alloc seq)
        self.leases: Counter = Counter()  # slot -> holders
        self.zombies: set[int] = set()
        self.reserved: list[int] = []
        self.next_id = 0

    def used(self) -> int:
        return len(self.live) + len(self.zombies) + len(self.reserved)

    def _drop(self, key: bytes) -> None:
        _, slot, _ = self.live.pop(key)
        if self.leases[slot]:
            self.zombies.add(slot)

    def touch(self, key: bytes) -> None:
        self.live.move_to_end(key)

    def alloc(self) -> int:
        if self.used() >= self.capacity:
            victim = next((k for k, (_, slot, _) in self.live.items() if not self.leases[slot]), None)
            if victim is None:
                self.on_event("pool full")
                raise PoolFullError("model: nothing evictable")
            self.on_event("capacity eviction")
            self._drop(victim)
        self.next_id += 1
        self.reserved.append(self.next_id)
        return self.next_id

    def put_many(self, items) -> None:
        slots = []
        try:
            for _ in items:
                slots.append(self.alloc())
        except PoolFullError:
            self.reserved.clear()  # the client aborts what it got; evictions already done stay done
            raise
        for (key, data), slot in zip(items, slots):
            self.reserved.remove(slot)
            if key in self.live:
                self._drop(key)
            self.live[key] = (data, slot, slot)

    def release(self, slot: int) -> None:
        self.leases[slot] -= 1
        if not self.leases[slot] and slot in self.zombies:
            self.zombies.discard(slot)

    def forget_leases(self) -> None:
        self.leases.clear()
        self.zombies.clear()

    def reorder_by_generation(self) -> None:
        self.live = OrderedDict(sorted(self.live.items(), key=lambda kv: kv[1][2]))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import os
        import uuid

        self.path = f"/dev/shm/beluga-prop-{os.getpid()}-{uuid.uuid4().hex[:8]}.pool"
        self.store = LocalStore(
            self.path,
            ServiceConfig(takeover_wait_s=0, heartbeat_timeout_s=1e9, lease_ttl_s=10.0, reservation_ttl_s=1e9),
            size_bytes=192 * KiB, segment_size_bytes=64 * KiB, max_clients=1, rpc_buffer_bytes=8 * KiB,
            slot_granularity_bytes=16 * KiB,  # 4 slots per segment: a handful of puts fill the pool
        )
        g = self.store.pool.geometry
        self.slots_per_segment = g.slot_layout(g.slot_granularity_bytes).slot_count
        self.model = Model(g.segment_count * self.slots_per_segment, event)
        self.client = self.store.client()
        self.views: list = []

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:  # a close that fails must not leave the pool file in /dev/shm
            os_unlink(self.path)

    @rule(key=key_st, data=data_st)
    def put(self, key, data):
        self._put_many([(key, data)])

    @rule(items=st.lists(st.tuples(key_st, data_st), min_size=1, max_size=6))
    def put_many(self, items):
        self._put_many(items)

    def _put_many(self, items):
        expect_full = False
        try:
            self.model.put_many(items)
        except PoolFullError:
            expect_full = True
        try:
            self.client.put_many(items)
            assert not expect_full, "store accepted a put the model says cannot fit"
        except PoolFullError:
            assert expect_full, "store refused a put the model says fits"

    @rule(key=key_st)
    def get(self, key):
        got = self.client.get(key)
        if key in self.model.live:
            assert got == self.model.live[key][0]
            self.model.touch(key)
        else:
            assert got is None

    @rule(keys=st.lists(key_st, max_size=8))
    def get_many(self, keys):
        got = self.client.get_many(keys)
        for key, g in zip(keys, got):
            if key in self.model.live:
                assert g == self.model.live[key][0]
                self.model.touch(key)
            else:
                assert g is None

    @rule(key=key_st)
    def contains(self, key):
        assert self.client.contains(key) == (key in self.model.live)
        if key in self.model.live:
            self.model.touch(key)

    @rule(keys=st.lists(key_st, max_size=8))
    def lookup_prefix(self, keys):
        n = 0
        for key in keys:
            if key not in self.model.live:
                break
            self.model.touch(key)
            n += 1
        assert self.client.lookup_prefix(keys) == n

    @rule(key=key_st)
    def delete(self, key):
        existed = key in self.model.live
        if existed:
            self.model._drop(key)
        assert self.client.delete(key) == existed

    @rule(count=st.integers(min_value=0, max_value=10))
    def evict(self, count):
        victims = [k for k, (_, slot, _) in self.model.live.items() if not self.model.leases[slot]][:count]
        for k in victims:
            self.model._drop(k)
        assert self.client.evict(count) == len(victims)

    def _hold(self, key):
        v = self.client.view(key)
        if key in self.model.live:
            data, slot, _ = self.model.live[key]
            assert v is not None and bytes(v.data) == data
            self.model.touch(key)
            self.model.leases[slot] += 1
            self.views.append((v, slot))
        else:
            assert v is None

    @rule(key=key_st)
    def hold(self, key):
        self._hold(key)

    @rule()
    def hold_everything(self):
        for key in list(self.model.live):
            self._hold(key)

    @precondition(lambda self: self.views)
    @rule(pick=st.integers(min_value=0, max_value=1000), count=st.integers(min_value=1, max_value=4))
    def release(self, pick, count):
        for _ in range(min(count, len(self.views))):
            v, slot = self.views.pop(pick % len(self.views))
            had_lease = v.lease != 0
            v.release()
            if had_lease and slot is not None:
                self.model.release(slot)
        self.client.flush_releases()

    @rule()
    def leases_expire(self):
        self.store.clock.advance(11.0)
        self.store.service.housekeeping(force=True)
        self.model.forget_leases()
        self.views = [(v, None) for v, _ in self.views]  # their leases are gone; releasing them is a no-op

    @rule()
    def service_restart(self):
        self.client.flush_releases()
        self.store.restart()
        # Leases are soft state, LRU order comes back as generation (allocation) order.
        self.model.forget_leases()
        self.model.reorder_by_generation()
        self.views = [(v, None) for v, _ in self.views]

    @invariant()
    def agrees_with_model(self):
        self.client.flush_releases()
        svc = self.store.service
        svc.check_invariants()
        st_ = svc.stats()
        assert st_["blocks"] == len(self.model.live)
        assert st_["zombies"] == len(self.model.zombies)
        assert st_["reserved"] == 0
        assert st_["slots_total"] - st_["slots_free"] + self.slots_per_segment * st_["segments"]["free"] >= self.model.used()
        assert set(svc.index) == set(self.model.live)
        assert list(svc.index) == list(self.model.live)  # same LRU order


def os_unlink(path: str) -> None:
    import os

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


TestStoreAgainstModel = StoreMachine.TestCase
TestStoreAgainstModel.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("seed", [0])
def test_model_itself_evicts_lru(seed):
    """Sanity of the model: evictions follow LRU and skip held slots."""
    m = Model(capacity=2)
    m.put_many([(b"a", b"1")])
    m.put_many([(b"b", b"2")])
    m.leases[m.live[b"a"][1]] += 1
    m.put_many([(b"c", b"3")])
    assert list(m.live) == [b"a", b"c"]
