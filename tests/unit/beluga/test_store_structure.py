"""The store's code keeps its shape: pool records only through layout.py, no private names across modules.

Two rules a reviewer would otherwise have to re-check on every change (issue 14):

* every on-pool record is read and written by its accessors in ``beluga/layout.py``, so the
  points where a payload is published (and where a non-coherent pool needs a cache flush) are
  the few named there; nowhere else packs or unpacks at a pool offset, names a record's field
  offsets, or slices a record out of the pool by its size;
* no module reaches into another object's private names (``x._name`` where x is not self or cls).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SOURCES = sorted([*(REPO / "beluga").glob("*.py"), *(REPO / "testbed" / "guest").glob("*.py")])

RECORD_OWNER = "layout.py"
CODEC = "rpc.py"
"""Message encoding: bytes objects, not pool offsets (its buffers are written through layout)."""
FIELD_NAMES = {
    "CLIENT_LINE", "SERVICE_LINE", "SERVICE_AREA", "SEGMENT_ENTRY", "INDEX_ENTRY", "BLOCK_HEADER", "TABLE_BUCKET",
    "TOUCH_ENTRY", "U64", "U32", "CLIENT_LINE_OFFSET", "SERVICE_LINE_OFFSET", "TOUCH_HEAD_OFFSET",
    "TABLE_LINE_OFFSET", "CL_CLAIM", "CL_REQ_SEQ", "CL_HEARTBEAT", "SL_OWNER", "SL_RESP_SEQ", "SL_EPOCH",
    "SA_HEARTBEAT",
}
"""A record's layout: structs and field offsets, which only layout.py may use."""
RECORD_SIZES = {"INDEX_ENTRY_BYTES", "SEGMENT_ENTRY_BYTES", "SEGMENT_RECORD_BYTES", "BLOCK_HEADER_BYTES",
                "TABLE_BUCKET_BYTES"}
"""Slicing ``buf[off : off + SIZE]`` reads or writes a record around its accessor."""


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _record_access(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and _name(node.func) in ("pack_into", "unpack_from") and path.name != CODEC:
            found.append(f"{where}: {ast.unparse(node.func)}(...) packs or unpacks in place")
        elif isinstance(node, ast.Attribute | ast.Name) and _name(node) in FIELD_NAMES and isinstance(
                getattr(node, "ctx", None), ast.Load):
            found.append(f"{where}: {ast.unparse(node)} is a record's layout")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            names = {_name(n) for n in ast.walk(node.slice)}
            if names & RECORD_SIZES:
                found.append(f"{where}: {ast.unparse(node)} slices a record out of the pool")
    return found


PUBLIC_UNDERSCORE = {
    "os._exit",  # the standard library's documented exit without cleanup (a forked child)
    "listener._accept",  # _socket.socket's accept: guest/reset.py avoids importing `socket` (startup time under TCG)
}
"""Names that start with an underscore but are the standard library's public API."""


def _private_access(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and \
                    ast.unparse(node) not in PUBLIC_UNDERSCORE:
                found.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and alias.name != "_native":
                    found.append(f"{where}: from {node.module or '.'} import {alias.name}")
    return found


def test_the_scan_sees_the_sources():
    names = {p.name for p in SOURCES}
    assert {"layout.py", "service.py", "client.py", "store.py"} <= names


def test_pool_records_are_read_and_written_only_through_layout():
    found = [f for p in SOURCES if p.name != RECORD_OWNER for f in _record_access(p)]
    assert not found, "raw record access outside beluga/layout.py (add or use an accessor there):\n" + "\n".join(found)


def test_no_module_uses_another_objects_private_names():
    found = [f for p in SOURCES for f in _private_access(p)]
    assert not found, "private names used from outside their object (make them public):\n" + "\n".join(found)


def test_the_scan_would_catch_a_raw_access(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import struct\n"
                   "def f(buf, g, s, c):\n"
                   "    struct.pack_into('<Q', buf, g.host_slot_offset(s) + L.SL_OWNER, 0)\n"
                   "    e = buf[o : o + L.INDEX_ENTRY_BYTES]\n"
                   "    return c._lookup([e], 0)\n")
    record = _record_access(bad, tmp_path)
    assert sorted(f.split(": ", 1)[0] for f in record) == ["bad.py:3", "bad.py:3", "bad.py:4"], record
    assert _private_access(bad, tmp_path) == ["bad.py:5: c._lookup"]
