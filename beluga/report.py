"""Read-only report of a pool's metadata, without a running service.

Reads only metadata (superblock, service area, host lines, segment table and
the index entries of non-free segments), never block data, so it is cheap even
where pool memory is slow. The service may change things while this reads;
the report is a snapshot for humans and tests, not a lock-step view.
"""
from __future__ import annotations

from . import layout as L
from .pool import Pool


def pool_report(pool: Pool) -> dict:
    g = pool.geometry
    buf = pool.buf
    area = L.read_service_area(buf, g)
    clients = []
    for slot in range(g.max_clients):
        owner, _, epoch = L.read_service_line(buf, g, slot)
        if owner:
            hb, pid, host = L.read_client_info(buf, g, slot)
            clients.append({"slot": slot, "epoch": epoch, "pid": pid, "heartbeat": hb, "host": host})
    seg_states = {name: 0 for name in L.SEG_STATE_NAMES.values()}
    committed = reserved = committed_bytes = torn = 0
    classes: dict[int, int] = {}
    keys = []
    invalid = []  # intact records the service cannot have written (it refuses to start on them)
    for si in range(g.segment_count):
        entry = L.read_segment_entry(buf, g.segment_entry_offset(si))
        if entry is None:
            torn += 1
            continue
        problem = L.segment_entry_problem(g, entry)
        if problem:
            invalid.append(f"segment {si}: {problem}")
            continue
        seg_states[L.SEG_STATE_NAMES[entry.state]] += 1
        if entry.state == L.SEG_FREE:
            continue
        classes[entry.data_slot_bytes] = classes.get(entry.data_slot_bytes, 0) + 1
        for sl, e in enumerate(L.read_index_entries(buf, g, si, entry.slot_count)):
            problem = L.index_entry_problem(e, entry.data_slot_bytes) if e is not None else None
            if e is None:
                torn += 1
            elif problem:
                invalid.append(f"segment {si} slot {sl}: {problem}")
            elif e.state == L.ENTRY_COMMITTED:
                committed += 1
                committed_bytes += e.length_bytes
                keys.append(e.key)
            elif e.state == L.ENTRY_RESERVED:
                reserved += 1
    return {
        "pool": pool.path,
        "devdax": pool.info.is_devdax,
        "layout_version": L.LAYOUT_VERSION,
        "uuid": pool.superblock.uuid.hex(),
        "geometry": {
            "pool_size_bytes": g.pool_size_bytes,
            "segment_size_bytes": g.segment_size_bytes,
            "segment_count": g.segment_count,
            "max_clients": g.max_clients,
            "rpc_buffer_bytes": g.rpc_buffer_bytes,
            "slot_granularity_bytes": g.slot_granularity_bytes,
            "max_block_bytes": g.max_block_bytes,
            "segments_offset": g.segments_offset,
        },
        "service": {"running": bool(area.nonce), "pid": area.pid, "host": area.host,
                    "heartbeat": area.heartbeat, "restarts": area.restarts, "tcp_address": area.tcp_address},
        "clients": clients,
        "segments": seg_states,
        "slot_classes": {str(k): v for k, v in sorted(classes.items())},
        "blocks": committed,
        "committed_bytes": committed_bytes,
        "reserved": reserved,
        "torn_records": torn,
        "invalid_records": invalid,
        "distinct_keys": len(set(keys)),
    }
