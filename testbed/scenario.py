"""Scenario files: versioned YAML with roles, steps (workloads, faults, waits) and expectations.

Validated like topologies: every error at once, each with file:line and the YAML path.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .topology import API_VERSION, TopologyError, _Checker, _Doc

SCENARIOS_DIR = Path(__file__).resolve().parent.parent / "scenarios"

# Step kind -> (required fields, optional fields).
STEPS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "put": ({"on": object, "set": str, "blocks": int},
            {"size_bytes": int, "background": bool, "delay_s": (int, float), "start": int}),
    "get": ({"on": object, "set": str}, {"blocks": int, "size_bytes": int, "start": int}),
    "wait": ({"seconds": (int, float)}, {}),
    "fault": ({}, {"kill_host": object, "hang_host": object, "seconds": (int, float), "nic_down": object,
                   "nic_up": object, "poison": dict, "media_event": dict, "bitflip": dict,
                   "kill_service": bool, "start_service": object}),
    "scan": ({"on": object}, {}),
    "stat": ({"on": object}, {}),
    "join": ({}, {}),
}
FAULT_KINDS = ("kill_host", "hang_host", "nic_down", "nic_up", "poison", "media_event", "bitflip",
               "kill_service", "start_service")
EXPECTS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "all_readable": ({"set": str}, {"on": object, "include_uncommitted": bool}),
    "no_torn_reads": ({}, {}),
    "never_returned": ({"set": str, "index": int}, {"on": object}),
    "guest_saw": ({"event": str}, {"on": object}),
    "quarantined": ({"set": str, "index": int}, {}),
    "no_reserved_space": ({}, {}),
    "evicted": ({"set": str}, {"at_least": int}),
}
ROLE_WORDS = ("service", "writers", "readers", "survivors", "all")


@dataclass(frozen=True)
class Step:
    kind: str
    args: dict
    name: str
    line: int


@dataclass(frozen=True)
class Expectation:
    kind: str
    args: dict
    line: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    source: str
    topology: str
    service: str
    writers: tuple[str, ...]
    readers: object  # a tuple of host names, or "others"
    store: dict
    steps: tuple[Step, ...]
    expect: tuple[Expectation, ...] = field(default=())

    def block_size(self, args: dict) -> int:
        return args.get("size_bytes", self.store.get("block_size_bytes", 65536))


def builtin() -> dict[str, Path]:
    return {p.relative_to(SCENARIOS_DIR).with_suffix("").as_posix(): p for p in sorted(SCENARIOS_DIR.rglob("*.yaml"))}


def resolve(ref: str) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    names = builtin()
    if ref in names:
        return names[ref]
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise TopologyError([f"{ref}: no such scenario file or built-in scenario ({hint}'beluga-testbed run --list')"])


def load(ref: str) -> Scenario:
    p = resolve(ref)
    return parse(p.read_text(), str(p))


def _typed(c: _Checker, v: Any, path: tuple, want) -> bool:
    if want is object:
        return True
    wants = want if isinstance(want, tuple) else (want,)
    if isinstance(v, bool) and bool not in wants:
        c.err(path, f"expected {' or '.join(w.__name__ for w in wants)}, got a boolean")
        return False
    if not isinstance(v, wants):
        c.err(path, f"expected {' or '.join(w.__name__ for w in wants)}, got {type(v).__name__}")
        return False
    return True


def _entry(c: _Checker, value: Any, path: tuple, table: dict, what: str, extra: tuple = ()) -> tuple[str, dict] | None:
    """One `- kind: {fields}` entry (steps may also carry `name`)."""
    if not isinstance(value, dict):
        c.err(path, f"expected a mapping like '- {next(iter(table))}: {{...}}'")
        return None
    kinds = [k for k in value if k not in extra]
    if len(kinds) != 1:
        c.err(path, f"expected exactly one {what} kind ({', '.join(table)}), got {', '.join(map(str, kinds)) or 'none'}")
        return None
    kind = kinds[0]
    if kind not in table:
        close = difflib.get_close_matches(str(kind), table, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        c.err(path + (kind,), f"unknown {what} ({hint}known: {', '.join(table)})")
        return None
    args = value[kind] if value[kind] is not None else {}
    req, opt = table[kind]
    if not isinstance(args, dict):
        c.err(path + (kind,), f"expected a mapping of {what} fields")
        return None
    for k in args:
        if k not in req and k not in opt:
            close = difflib.get_close_matches(str(k), list(req) + list(opt), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(list(req) + list(opt)) or 'none'}"
            c.err(path + (kind, k), f"unknown field ({hint})")
    for k, t in req.items():
        if k not in args:
            c.err(path + (kind,), f"missing required field '{k}'")
        else:
            _typed(c, args[k], path + (kind, k), t)
    for k, t in opt.items():
        if k in args:
            _typed(c, args[k], path + (kind, k), t)
    return kind, args


def parse(text: str, file: str = "<scenario>") -> Scenario:
    doc = _Doc(file, text)
    c = _Checker(doc)
    top = c.mapping(doc.data, (), {"apiVersion": str, "kind": str, "name": str, "roles": dict, "steps": list},
                    {"description": str, "topology": str, "store": dict, "expect": list})
    if top is None:
        raise TopologyError(c.errors)
    if top.get("apiVersion") not in (None, API_VERSION):
        c.err(("apiVersion",), f"expected '{API_VERSION}', got '{top['apiVersion']}'")
    if top.get("kind") not in (None, "Scenario"):
        c.err(("kind",), f"expected 'Scenario', got '{top['kind']}'")
    roles = c.mapping(top.get("roles", {}), ("roles",), {"service": str, "writers": list},
                      {"readers": object}) or {}
    readers = roles.get("readers", "others")
    if not (readers == "others" or (isinstance(readers, list) and all(isinstance(r, str) for r in readers))):
        c.err(("roles", "readers"), f"expected a list of host names or 'others', got {readers!r}")
    store = c.mapping(top.get("store", {}), ("store",), {},
                      {"block_size_bytes": int, "segment_size_bytes": int, "heartbeat_timeout_s": (int, float),
                       "lease_ttl_s": (int, float), "max_clients": int}) or {}
    steps = []
    for i, raw in enumerate(top.get("steps", [])):
        e = _entry(c, raw, ("steps", i), STEPS, "step", extra=("name",))
        if e is None:
            continue
        kind, args = e
        if kind == "fault":
            given = [k for k in args if k in FAULT_KINDS]
            if len(given) != 1:
                c.err(("steps", i, "fault"), f"expected exactly one fault ({', '.join(FAULT_KINDS)}), "
                                             f"got {', '.join(given) or 'none'}")
            if "hang_host" in args and "seconds" not in args:
                c.err(("steps", i, "fault"), "hang_host needs 'seconds' (how long the host stays stopped)")
            for k in ("poison", "media_event", "bitflip"):
                if k in args:
                    for need in ("set", "index"):
                        if need not in args[k]:
                            c.err(("steps", i, "fault", k), f"missing required field '{need}' (the block to hit)")
        name = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else \
            f"{kind} " + ", ".join(f"{k}={v}" for k, v in args.items())
        steps.append(Step(kind, args, name, doc.line(("steps", i))))
    expect = []
    for i, raw in enumerate(top.get("expect", []) or []):
        e = _entry(c, raw, ("expect", i), EXPECTS, "expectation")
        if e:
            expect.append(Expectation(e[0], e[1], doc.line(("expect", i))))
    if c.errors:
        raise TopologyError(c.errors)
    return Scenario(name=top["name"], description=top.get("description", ""), source=file,
                    topology=top.get("topology", "4hosts-1switch"), service=roles["service"],
                    writers=tuple(roles["writers"]), readers=tuple(readers) if isinstance(readers, list) else "others",
                    store=store, steps=tuple(steps), expect=tuple(expect))
