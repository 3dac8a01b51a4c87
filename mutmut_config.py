"""mutmut's hook (read from the working folder): which mutants of a group `make mutate` tests.

scripts/mutate.py runs mutmut once per group of GROUPS with that group's test files as
the runner and MUTATE_GROUP set; pre_mutation() below then skips every mutant outside
the group's functions, and keeps a fixed, deterministic sample of the rest (a hash of
file, line and mutation index: the same mutants every run, so runs compare).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os

# name -> (file, functions by qualified name (None: the whole file), test files, sample fraction)
GROUPS: dict[str, tuple[str, tuple[str, ...] | None, tuple[str, ...], float]] = {
    # The store's data path: what a reader or writer does with pool memory and the RPCs.
    "client": ("beluga/client.py", (
        "BelugaClient._verify", "BelugaClient.get_many", "BelugaClient.get_many_into", "BelugaClient.view",
        "BelugaClient._put_batch_once", "BelugaClient.put_many", "BelugaClient._lookup", "BelugaClient._corrupt",
        "BelugaClient.delete_many", "BelugaClient.contains", "BelugaClient.lookup_prefix",
    ), ("tests/unit/beluga/test_store_client.py", "tests/unit/beluga/test_store_client_verify.py"), 0.3),
    # The service's block life cycle: allocate, commit, look up under a lease, free, evict, reap
    # (beluga/index.py since the service was split; the group keeps its name).
    "service": ("beluga/index.py", (
        "BlockIndex.alloc_one", "BlockIndex.commit_one", "BlockIndex.abort_one",
        "BlockIndex.drop_lease", "BlockIndex.evict", "BlockIndex._free_slot",
        "BlockIndex._unindex", "BlockIndex.lookup_one", "BlockIndex.delete",
        "BlockIndex.release_holder", "BlockIndex._locate",
    ), ("tests/unit/beluga/test_store_service.py", "tests/unit/beluga/test_store_service_counts.py"), 0.16),
    # The on-pool format: geometry, records and their checks.
    "layout": ("beluga/layout.py", (
        "compute_geometry", "compute_geometry.place", "parse_size", "_is_pow2", "_round_up",
        "decode_superblock", "block_header_matches", "BlockHeader.encode", "BlockHeader.decode",
        "IndexEntry.encode", "IndexEntry.decode", "SegmentEntry.encode", "SegmentEntry.decode",
        "read_segment_entry", "write_segment_entry", "Geometry.index_entry_offset", "Geometry.header_offset",
        "Geometry.segment_offset", "Geometry.segment_entry_offset", "Geometry.host_slot_offset",
    ), ("tests/unit/beluga/test_store_layout.py", "tests/unit/beluga/test_store_layout_places.py"), 0.3),
    # Topology validation: every rule and the path/line it reports.
    "topology": ("testbed/topology.py", (
        "_check", "_hosts", "_devices", "_bridges", "_bridges.attach", "_windows", "_pool", "_check_granularity",
    ), ("tests/unit/test_topology_validation.py", "tests/unit/test_topology_messages.py"), 0.3),
    # Provisioning on the host side: interleave arithmetic, order by serial, verification.
    "provision": ("testbed/provision.py", (
        "locate", "sample_offsets", "signature", "signing_plan", "pool_args", "verify", "verify.where",
        "verify.read", "provision", "_collect_at_boot", "_collect_at_boot.collect", "pool_table",
    ), ("tests/unit/test_provision.py",), 0.4),
    # The scenario expectations: each one's verdict and evidence on what a run recorded.
    "expectations": ("testbed/scenario/runner.py", (
        "AllReadable.check_run", "NoTornReads.check_run", "NeverReturned.check", "NeverReturned.check_run",
        "GuestSaw.check_run", "Quarantined.check_run", "NoReservedSpace.check_run", "Evicted.check_run",
        "_program_hosts", "ExitCode.check_run", "OutputMatches.check_run", "FileWritten.check_run",
    ), ("tests/unit/test_expectations.py",), 0.5),
}


@functools.cache
def _spans(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in the file."""
    out: list[tuple[int, int, str]] = []

    def walk(node, prefix: str) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = prefix + ch.name
                if not isinstance(ch, ast.ClassDef):
                    out.append((ch.lineno, ch.end_lineno or ch.lineno, q))
                walk(ch, q + ".")

    with open(path) as f:
        walk(ast.parse(f.read()), "")
    return out


def function_at(path: str, line: int) -> str:
    """The innermost function holding 1-based `line`, or '<module>'."""
    inner = [s for s in _spans(path) if s[0] <= line <= s[1]]
    return min(inner, key=lambda s: s[1] - s[0])[2] if inner else "<module>"


def sampled(path: str, line: int, index: int, fraction: float) -> bool:
    if fraction >= 1.0:
        return True
    h = hashlib.sha256(f"{path}:{line}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") < fraction * 2**32


def selected(group: str, path: str, line: int, index: int) -> bool:
    file, functions, _, fraction = GROUPS[group]
    if os.path.normpath(path) != os.path.normpath(file):
        return False
    if functions is not None and function_at(path, line) not in functions:
        return False
    return sampled(path, line, index, fraction)


def pre_mutation(context) -> None:
    group = os.environ.get("MUTATE_GROUP")
    if not group:
        return
    mid = context.mutation_id
    if not selected(group, context.filename, mid.line_number + 1, mid.index):
        context.skip = True
