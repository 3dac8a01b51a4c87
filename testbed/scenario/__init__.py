"""Scenario files: versioned YAML with roles, steps (workloads, programs, faults, waits)
and expectations, parsed into frozen dataclasses.

Every step kind, fault kind and expectation kind is ONE frozen dataclass, registered
with `@step(...)`, `@fault(...)` or `@expectation(...)`, whose fields say what the YAML
may hold (type, default, bounds, one line of documentation) and whose `run`/`check`
method is what the runner does with it. The parser, the validation, the runner's
dispatch and the docs table (docs/scenarios.md, checked by a test) all come from that
registry: adding a fault is one class with one method, in testbed/faults.py.

Validated like topologies, every error at once as `file:line: yaml.path: message`:
first the file on its own (`parse`), then against the topology it will run on
(`check`: hosts and roles exist, block sizes fit the pool, every fault's target exists),
before any VM boots.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import names, yamlcheck
from .. import kernel as kernel_mod
from ..kernel import UserKernel
from ..log import TestbedError
from ..topology import API_VERSION, Topology
from ..yamlcheck import Checker as _Checker
from ..yamlcheck import ConfigError, did_you_mean

SCENARIOS_DIR = Path(__file__).resolve().parents[2] / "scenarios"
ROLE_WORDS = ("service", "writers", "readers", "survivors", "all")
DEFAULT_BLOCK_BYTES = 65536
MAX_SECONDS = 24 * 3600  # a wait, hang or timeout longer than a day is a typo


class ScenarioError(ConfigError):
    """Every mistake found in a scenario file (the CLI prints 'invalid scenario:')."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("scenario", errors)


# ---------------------------------------------------------------- field types

class FieldType:
    """What one YAML field may hold: `parse` returns the value to store, or records an
    error with the checker and returns None."""

    doc = ""

    def parse(self, c: _Checker, v: Any, path: tuple) -> Any:
        raise NotImplementedError


def _bad(c: _Checker, path: tuple, want: str, v: Any) -> None:
    got = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(v), f"{type(v).__name__} {v!r}" if isinstance(v, (int, float)) else type(v).__name__)
    c.err(path, f"expected {want}, got {got}")


# A NUL cannot pass through SSH and exec to a guest program: the word ends there.
NUL_WHY = "contains a NUL byte (a command line or environment cannot hold one)"


class Str(FieldType):
    doc = "text"

    def parse(self, c, v, path):
        if not isinstance(v, str):
            return _bad(c, path, "a string", v)
        if "\0" in v:
            return c.err(path, NUL_WHY)
        return v


class Name(FieldType):
    """A name that becomes part of keys, folders or report ids: testbed/names.py's rule."""
    doc = "a name"

    def parse(self, c, v, path):
        why = names.problem(v)
        if why:
            return c.err(path, why)
        return v


class Regex(FieldType):
    doc = "a regular expression"

    def parse(self, c, v, path):
        if not isinstance(v, str):
            return _bad(c, path, "a regular expression (a string)", v)
        try:
            re.compile(v)
        except re.error as e:
            return c.err(path, f"not a valid regular expression: {e}")
        return v


class Bool(FieldType):
    doc = "true/false"

    def parse(self, c, v, path):
        if not isinstance(v, bool):
            return _bad(c, path, "true or false", v)
        return v


@dataclass(frozen=True)
class Int(FieldType):
    lo: int = 0
    hi: int = 2**62
    doc = "an integer"

    def parse(self, c, v, path):
        if not isinstance(v, int) or isinstance(v, bool):
            return _bad(c, path, "an integer", v)
        if not self.lo <= v <= self.hi:
            return c.err(path, f"expected an integer from {self.lo} to {self.hi}, got {v}")
        return v


@dataclass(frozen=True)
class Seconds(FieldType):
    """A positive duration (0 allowed where `zero_ok`)."""
    zero_ok: bool = False
    doc = "seconds"

    def parse(self, c, v, path):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return _bad(c, path, "a number of seconds", v)
        if not (0 <= v if self.zero_ok else 0 < v) or v > MAX_SECONDS or v != v:
            return c.err(path, f"expected {'0' if self.zero_ok else 'more than 0'} to {MAX_SECONDS} seconds, got {v}")
        return float(v) if isinstance(v, float) else v


@dataclass(frozen=True)
class Choice(FieldType):
    options: tuple[str, ...]

    @property
    def doc(self):  # type: ignore[override]
        return " or ".join(self.options)

    def parse(self, c, v, path):
        if v not in self.options:
            hint = did_you_mean(str(v), self.options)
            return c.err(path, f"unknown value {v!r} ({hint}known: {', '.join(self.options)})")
        return v


class StrList(FieldType):
    doc = "a list of strings"

    def parse(self, c, v, path):
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            return _bad(c, path, "a non-empty list of strings", v)
        if bad := [i for i, x in enumerate(v) if "\0" in x]:
            return c.err(path + (bad[0],), NUL_WHY)
        return tuple(v)


class Env(FieldType):
    doc = "a mapping NAME: value"

    def parse(self, c, v, path):
        if not isinstance(v, dict):
            return _bad(c, path, "a mapping of environment variables", v)
        out = {}
        for k, x in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
                c.err(path + (k,), "not an environment variable name (letters, digits, '_')")
            elif not isinstance(x, (str, int, float)) or isinstance(x, bool):
                _bad(c, path + (k,), "a string or a number", x)
            elif "\0" in str(x):
                c.err(path + (k,), NUL_WHY)
            else:
                out[str(k)] = str(x)
        return tuple(sorted(out.items()))


class Hosts(FieldType):
    """Hosts by name or role, one or a list; checked against the topology in `check`."""
    doc = "host, role or list"

    def parse(self, c, v, path):
        items = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            return c.err(path, f"expected at least one host or role ({', '.join(ROLE_WORDS)})")
        for i, x in enumerate(items):
            p = path + (i,) if isinstance(v, list) else path
            if not isinstance(x, str):
                return _bad(c, p, "a host name or a role", x)
            if x not in ROLE_WORDS and names.problem(x):
                return c.err(p, f"not a host name or role: {names.problem(x)}")
        return tuple(v) if isinstance(v, list) else v


class OneHost(Hosts):
    doc = "host or role"

    def parse(self, c, v, path):
        if isinstance(v, list):
            return _bad(c, path, "one host name or role", v)
        return super().parse(c, v, path)


def arg(type_: FieldType, doc: str = "", default: Any = dataclasses.MISSING, *, yaml: str | None = None) -> Any:
    """A field a scenario file may set: its type, its one-line meaning for the docs table,
    a default (none: the field is required), and its YAML key where that is not the
    field's name (`kind` is taken by the class)."""
    return field(default=default, metadata={"type": type_, "doc": doc, **({"yaml": yaml} if yaml else {})})


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True, kw_only=True)
class Node:
    """Base of every step, fault and expectation: where it was written."""
    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    line: int = field(default=0, compare=False, metadata={"internal": True})
    path: tuple = field(default=(), compare=False, metadata={"internal": True})

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    def args(self) -> dict:
        """The fields given a value other than their default, as written (for the report)."""
        out = {}
        for f in self.fields():
            v = getattr(self, f.name)
            if f.default is dataclasses.MISSING or v != f.default:
                if isinstance(f.metadata["type"], Env):
                    v = dict(v)
                elif isinstance(v, tuple):
                    v = list(v)
                out[f.metadata.get("yaml", f.name)] = v
        return out


@dataclass(frozen=True, kw_only=True)
class Step(Node):
    label: str = field(default="", compare=False, metadata={"internal": True})

    @property
    def name(self) -> str:
        return self.label or f"{self.kind} " + ", ".join(f"{k}={v}" for k, v in self.args().items())

    def run(self, r, rec) -> None:  # the runner's Run and this step's StepRecord
        raise NotImplementedError

    def check(self, sc: Scenario, t: Topology, c: _Checker) -> None:
        """Checks against the topology and the steps before this one (see `check`)."""


@dataclass(frozen=True, kw_only=True)
class Fault(Node):
    primary: ClassVar[str | None] = None  # the field `fault: {KIND: VALUE}` sets; None: VALUE is a mapping

    def run(self, r, rec) -> None:
        raise NotImplementedError

    def check(self, sc: Scenario, t: Topology, c: _Checker) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class Expectation(Node):
    # Checked after every other expectation of the scenario, whatever its place in
    # `expect:`: it judges reads of the whole run, and the others' reads belong to it.
    WHOLE_RUN = False

    def check_run(self, r) -> tuple[bool, str]:  # (holds, evidence)
        raise NotImplementedError

    def check(self, sc: Scenario, t: Topology, c: _Checker) -> None:
        pass


STEPS: dict[str, type[Step]] = {}
FAULTS: dict[str, type[Fault]] = {}
EXPECTS: dict[str, type[Expectation]] = {}


def _register(table: dict, kind: str, summary: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if kind in table:
            raise ValueError(f"{kind} registered twice")
        cls = dataclass(frozen=True, kw_only=True)(cls)
        cls.kind, cls.summary = kind, summary
        table[kind] = cls
        return cls
    return deco


def step(kind: str, summary: str) -> Callable[[type], type]:
    return _register(STEPS, kind, summary)


def fault(kind: str, summary: str) -> Callable[[type], type]:
    return _register(FAULTS, kind, summary)


def expectation(kind: str, summary: str) -> Callable[[type], type]:
    return _register(EXPECTS, kind, summary)


# ---------------------------------------------------------------- the scenario

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
    expect: tuple[Expectation, ...] = ()
    shares: tuple[str, ...] = ()  # HOST_DIR[:GUEST_DIR[:rw]], as `up --share`; relative to the file's folder
    # A user's kernel, initrd, modules tree and QEMU (`kernel:`, as a topology's; paths
    # relative to the file's folder, checked when it is read): over the topology's, field
    # by field; `run --kernel/--initrd/--modules/--qemu` over these.
    kernel: UserKernel | None = None
    doc: Any = field(default=None, compare=False, repr=False)

    def share_list(self) -> list:
        """The shares as testbed/shares.py's Share objects (TestbedError, located, if one is bad)."""
        if not self.shares:
            return []
        from .. import shares as shares_mod
        base = Path(self.source).resolve().parent
        out = [shares_mod.parse(spec, i, base, where=self._where(("shares", i)))
               for i, spec in enumerate(self.shares)]
        return shares_mod.parse_all([s.spec for s in out]) if len(out) > 1 else out

    def _where(self, path: tuple) -> str:
        line = self.doc.line(path) if self.doc is not None else 1
        return f"{self.source}:{line}: {yamlcheck.fmt_path(path)}"

    def block_size(self, size_bytes: int | None) -> int:
        return size_bytes or self.store.get("block_size_bytes", DEFAULT_BLOCK_BYTES)


def builtin() -> dict[str, Path]:
    return {p.relative_to(SCENARIOS_DIR).with_suffix("").as_posix(): p for p in sorted(SCENARIOS_DIR.rglob("*.yaml"))}


def resolve(ref: str) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    found = builtin()
    if ref in found:
        return found[ref]
    hint = did_you_mean(ref, found)
    raise ScenarioError([f"{ref}: no such scenario file or built-in scenario ({hint}'beluga-testbed run --list')"])


def load(ref: str) -> Scenario:
    p = resolve(ref)
    return _parse(_read(lambda: yamlcheck.read(p, "scenario")), str(p))


def _read(load_doc: Callable[[], yamlcheck.Doc]) -> yamlcheck.Doc:
    try:
        return load_doc()
    except ConfigError as e:  # the loader's errors (syntax, duplicate keys, aliases) as this file's
        raise ScenarioError(e.errors) from None


def _fields(c: _Checker, cls: type[Node], raw: Any, path: tuple) -> dict | None:
    """The dataclass fields of `cls` read from mapping `raw`: unknown keys (did-you-mean),
    missing required ones, each value through its FieldType."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        c.err(path, f"expected a mapping of {cls.kind} fields")
        return None
    spec = {f.metadata.get("yaml", f.name): f for f in cls.fields()}
    out: dict = {}
    ok = True
    for k in raw:
        if k not in spec:
            close = difflib.get_close_matches(str(k), spec, n=1)
            c.err(path + (k,), "unknown field (" + (f"did you mean '{close[0]}'?)" if close else
                                                    f"known: {', '.join(spec) or 'none'})"))
            ok = False
    for name, f in spec.items():
        if name not in raw:
            if f.default is dataclasses.MISSING:
                doc = f.metadata.get("doc")
                c.err(path, f"missing required field '{name}'" + (f" ({doc})" if doc else ""))
                ok = False
            continue
        before = len(c.errors)
        v = f.metadata["type"].parse(c, raw[name], path + (name,))
        if len(c.errors) > before:
            ok = False
        else:
            out[f.name] = v
    return out if ok else None


def _entry(c: _Checker, value: Any, path: tuple, table: dict, what: str, extra: tuple = ()) -> tuple[str, Any] | None:
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
        hint = did_you_mean(str(kind), table)
        c.err(path + (kind,), f"unknown {what} ({hint}known: {', '.join(table)})")
        return None
    return kind, value[kind]


def _fault(c: _Checker, raw: Any, path: tuple) -> Fault | None:
    """`fault: {KIND: VALUE, other fields}`: VALUE is the primary field of KIND, or a
    mapping of its fields when it has none (`poison: {set: a, index: 5}`), or `true`."""
    if not isinstance(raw, dict):
        c.err(path, f"expected a mapping with one fault ({', '.join(FAULTS)})")
        return None
    given = [k for k in raw if k in FAULTS]
    if len(given) != 1:
        unknown = [k for k in raw if k not in FAULTS]
        if not given and unknown:
            hint = did_you_mean(str(unknown[0]), FAULTS)
            c.err(path + (unknown[0],), f"unknown fault ({hint}known: {', '.join(FAULTS)})")
        else:
            c.err(path, f"expected exactly one fault ({', '.join(FAULTS)}), got {', '.join(given) or 'none'}")
        return None
    kind = given[0]
    cls = FAULTS[kind]
    fpath = path + (kind,)
    value, rest = raw[kind], {k: v for k, v in raw.items() if k != kind}
    if cls.primary is not None:  # the primary field's YAML key is the fault's kind
        args = _fields(c, cls, {kind: value, **rest}, path)
    elif not cls.fields():
        if value is not True:
            c.err(fpath, f"expected 'true' ({kind} takes no fields)")
        for k in rest:
            c.err(path + (k,), f"unknown field ({kind} takes no fields)")
        args = {} if value is True and not rest else None
    else:
        for k in rest:
            c.err(path + (k,), f"unknown field (the fields of {kind} go inside '{kind}: {{...}}')")
        args = _fields(c, cls, value, fpath)
        args = None if rest else args
    if args is None:
        return None
    return cls(**args, line=c.doc.line(fpath), path=path if cls.primary is not None else fpath)


COHERENCE_MODES = ("off", "check", "check-collect")  # store.coherence: beluga/coherence.py's sanitizer


def parse(text: str, file: str = "<scenario>") -> Scenario:
    return _parse(_read(lambda: yamlcheck.load(text, file, "scenario")), file)


def _parse(doc: yamlcheck.Doc, file: str) -> Scenario:
    c = _Checker(doc, "scenario")
    top = c.mapping(doc.data, (), {"apiVersion": str, "kind": str, "name": str, "roles": dict, "steps": list},
                    {"description": str, "topology": str, "store": dict, "expect": list, "shares": list,
                     "kernel": dict})
    if top is None:
        raise ScenarioError(c.errors)
    if top.get("apiVersion") not in (None, API_VERSION):
        c.err(("apiVersion",), f"expected '{API_VERSION}', got '{top['apiVersion']}'")
    if top.get("kind") not in (None, "Scenario"):
        c.err(("kind",), f"expected 'Scenario', got '{top['kind']}'")
    if "name" in top:
        Name().parse(c, top["name"], ("name",))
    roles = c.mapping(top.get("roles", {}), ("roles",), {"service": str, "writers": list},
                      {"readers": object}) or {}
    for key in ("service",):
        if key in roles:
            OneHost().parse(c, roles[key], ("roles", key))
    if "writers" in roles:
        Hosts().parse(c, roles["writers"], ("roles", "writers"))
    readers = roles.get("readers", "others")
    if not (readers == "others" or (isinstance(readers, list) and all(isinstance(r, str) for r in readers))):
        c.err(("roles", "readers"), f"expected a list of host names or 'others', got {readers!r}")
    elif isinstance(readers, list):
        Hosts().parse(c, readers, ("roles", "readers"))
    # Keys checked by the mapping, values by the field types (numbers with bounds).
    store_types = {"block_size_bytes": Int(1, 1 << 40), "segment_size_bytes": Int(1, 1 << 40),
                   "heartbeat_timeout_s": Seconds(), "lease_ttl_s": Seconds(), "max_clients": Int(1, 4096),
                   "coherence": Choice(COHERENCE_MODES)}
    store = c.mapping(top.get("store", {}), ("store",), {}, {k: object for k in store_types}) or {}
    for k, typ in store_types.items():
        if k in store:
            typ.parse(c, store[k], ("store", k))
    shares = []
    for i, spec in enumerate(top.get("shares", []) or []):
        if isinstance(spec, str) and spec:
            shares.append(spec)
        else:
            _bad(c, ("shares", i), "a share 'HOST_DIR[:GUEST_DIR[:rw]]'", spec)
    kernel = kernel_mod.from_yaml(c, top["kernel"]) if "kernel" in top else None
    steps: list[Step] = []
    for i, raw in enumerate(top.get("steps", [])):
        path = ("steps", i)
        e = _entry(c, raw, path, STEPS, "step", extra=("name",))
        if e is None:
            continue
        kind, value = e
        label = raw.get("name", "")
        if not isinstance(label, str):
            _bad(c, path + ("name",), "a string (the step's label in the report)", label)
        cls = STEPS[kind]
        if kind == "fault":
            f = _fault(c, value, path + (kind,))
            args = {"fault": f} if f is not None else None
        else:
            args = _fields(c, cls, value, path + (kind,))
        if args is not None:
            try:
                steps.append(cls(**args, label=label if isinstance(label, str) else "", line=doc.line(path),
                                 path=path + (kind,)))
            except ValueError as err:  # a rule between fields (`__post_init__`)
                c.err(path + (kind,), str(err))
    expect: list[Expectation] = []
    for i, raw in enumerate(top.get("expect", []) or []):
        path = ("expect", i)
        e = _entry(c, raw, path, EXPECTS, "expectation")
        if e is None:
            continue
        cls = EXPECTS[e[0]]
        args = _fields(c, cls, e[1], path + (e[0],))
        if args is not None:
            try:
                expect.append(cls(**args, line=doc.line(path), path=path + (e[0],)))
            except ValueError as err:
                c.err(path + (e[0],), str(err))
    if c.errors:
        raise ScenarioError(c.errors)
    return Scenario(name=top["name"], description=top.get("description", ""), source=file,
                    topology=top.get("topology", "4hosts-1switch"), service=roles["service"],
                    writers=tuple(roles["writers"]), readers=tuple(readers) if isinstance(readers, list) else "others",
                    store=store, steps=tuple(steps), expect=tuple(expect), shares=tuple(shares), kernel=kernel,
                    doc=doc)


# ---------------------------------------------------------------- against a topology

def hosts_problem(on: Any, t: Topology) -> str | None:
    """Why `on` (a host, a role or a list) names something the topology lacks."""
    known = [h.name for h in t.hosts]
    for x in on if isinstance(on, tuple) else (on,):
        if x in ROLE_WORDS or x in known:
            continue
        hint = did_you_mean(x, [*ROLE_WORDS, *known])
        return (f"unknown host or role '{x}' ({hint}roles: {', '.join(ROLE_WORDS)}; "
                f"hosts of {t.name}: {', '.join(known)})")
    return None


def check(sc: Scenario, t: Topology) -> None:
    """Everything that can be known before a VM boots, against topology `t`: roles and
    every `on`/host field name hosts it has, block sizes fit its pool, every fault's and
    expectation's target exists (a block of a set an earlier step put, a run an earlier
    step started). Raises ScenarioError with every problem."""
    c = _Checker(sc.doc if sc.doc is not None else yamlcheck.load("{}", sc.source, "scenario"), "scenario")
    known = [h.name for h in t.hosts]
    for role, value in (("service", (sc.service,)), ("writers", sc.writers),
                        ("readers", sc.readers if sc.readers != "others" else ())):
        for x in value:
            if x not in known:
                hint = did_you_mean(x, known)
                c.err(("roles", role), f"no host '{x}' in topology {t.name} ({hint}hosts: {', '.join(known)})")
    if sc.shares:
        from .. import shares as shares_mod
        base, ok = Path(sc.source).resolve().parent, True
        for i, spec in enumerate(sc.shares):
            try:
                shares_mod.parse(spec, i, base, where=sc._where(("shares", i)))
            except TestbedError as e:  # already located: file:line: shares[i]: ...
                c.errors.append(e.message)
                ok = False
        if ok:
            try:
                sc.share_list()  # across them: no guest folder twice, none inside another
            except TestbedError as e:
                c.err(("shares",), e.message)
    if sc.kernel is not None:  # with the topology's: modules or an initrd need a kernel from one of them
        uk = sc.kernel.over(t.kernel)
        paths_bad = kernel_mod.problems(uk, whole=False)  # each path: reported where it was read
        for f, why in kernel_mod.problems(uk).items():
            if f not in paths_bad:
                c.err(("kernel", f) if getattr(sc.kernel, f) is not None else ("kernel",), why)
    pool = t.pool_size_bytes
    for k in ("block_size_bytes", "segment_size_bytes"):
        if sc.store.get(k, 0) > pool // 2:
            c.err(("store", k), f"{sc.store[k]} bytes do not fit the pool of {t.name} "
                                f"({pool >> 20} MiB, half of it at most for one {k.split('_')[0]})")
    for s in sc.steps:
        _check_node(s, sc, t, c)
        if s.kind == "fault":
            _check_node(s.fault, sc, t, c)
    for e in sc.expect:
        _check_node(e, sc, t, c)
    if c.errors:
        raise ScenarioError(c.errors)


def _check_node(node: Node, sc: Scenario, t: Topology, c: _Checker) -> None:
    for f in node.fields():
        if isinstance(f.metadata["type"], Hosts):
            v = getattr(node, f.name)
            if v is not None and (why := hosts_problem(v, t)):
                c.err(node.path + (f.metadata.get("yaml", f.name),), why)
    node.check(sc, t, c)


def steps_before(sc: Scenario, node: Node) -> tuple[Step, ...]:
    """The steps written before `node` (all of them for an expectation)."""
    if node.path[:1] != ("steps",):
        return sc.steps
    return tuple(s for s in sc.steps if s.path[1] < node.path[1])


def check_set(sc: Scenario, node: Node, c: _Checker) -> list[Step]:
    """Set `node.set` must be put by a step before `node` (by any step, for an
    expectation), else the error is on `set`, with did-you-mean. Returns those puts."""
    puts = [s for s in steps_before(sc, node) if s.kind == "put" and s.set == node.set]
    if not puts:
        sets = sorted({s.set for s in steps_before(sc, node) if s.kind == "put"})
        hint = did_you_mean(node.set, sets)
        step = node.path[:1] == ("steps",)
        c.err(node.path + ("set",), f"no step {'before this one ' if step else ''}puts set '{node.set}' "
                                    f"({hint}sets put{' so far' if step else ''}: {', '.join(sets) or 'none'})")
    return puts


def check_block(sc: Scenario, node: Node, c: _Checker) -> None:
    """Block `node.set/node.index` must exist when `node` runs: an earlier step puts the
    set (else the error is on `set`) and its index is in that put's range (else on `index`)."""
    puts = check_set(sc, node, c)
    if puts and not any(p.start <= node.index < p.start + p.blocks for p in puts):
        ranges = ", ".join(f"{p.start}-{p.start + p.blocks - 1}" for p in puts)
        c.err(node.path + ("index",), f"block {node.index} of set '{node.set}' is never put (indices put: {ranges})")


def own_topology(sc: Scenario) -> str:
    """The scenario's `topology:` as `up` takes it: a built-in name as written, a file
    relative to the scenario's own folder (as its `shares:` are), wherever the run starts."""
    t = sc.topology
    if (t.endswith((".yaml", ".yml")) or "/" in t) and not Path(t).is_absolute():
        return str(Path(sc.source).resolve().parent / t)
    return t


def topology_of(sc: Scenario, topology_ref: str | None = None) -> Topology:
    """The topology `sc` runs on: `topology_ref` (`--topology`) or the scenario's own
    `topology:`, where a name that is no topology is the scenario's error, on that line."""
    from .. import topology as topo
    if topology_ref is None:
        try:
            topo.resolve(own_topology(sc))
        except topo.TopologyError as e:
            raise ScenarioError([f"{sc._where(('topology',))}: {m}" for m in e.errors]) from None
    return topo.load(topology_ref or own_topology(sc))


def load_checked(ref: str, topology_ref: str | None = None) -> tuple[Scenario, Topology]:
    sc = load(ref)
    t = topology_of(sc, topology_ref)
    check(sc, t)
    return sc, t


def docs_tables() -> str:
    """The tables of docs/scenarios.md, from the registry (a test keeps the docs equal to
    this: `python -m testbed.scenario` prints it)."""
    def fields(cls) -> str:
        parts = []
        for f in cls.fields():
            t = f.metadata["type"]
            key = f.metadata.get("yaml", f.name)
            if f.default is dataclasses.MISSING:
                default = ""
            elif f.default is None or f.default == () or f.default is False:
                default = " (optional)"
            else:
                default = f" (default {f.default!r})"
            parts.append(f"`{key}`: {f.metadata['doc'] or t.doc}{default}")
        return "<br>".join(parts) or "none"

    out = ["| step | fields | what |", "|---|---|---|"]
    out += [f"| `{k}` | {fields(c)} | {c.summary} |" for k, c in STEPS.items()]
    out += ["", "Faults (`fault: {KIND: ...}`; `name:` beside `fault:` labels the step in the report):", "",
            "| fault | fields | how |", "|---|---|---|"]
    for k, c in FAULTS.items():
        form = (f"`{k}: true`" if not c.fields() else
                f"`{k}: {{...}}`: " if c.primary is None else "")
        out.append(f"| `{k}` | {form}{fields(c) if c.fields() else ''} | {c.summary} |")
    out += ["", "Expectations (each is checked at the end, with a fresh read where it applies):", "",
            "| expectation | fields | holds when |", "|---|---|---|"]
    out += [f"| `{k}` | {fields(c)} | {c.summary} |" for k, c in EXPECTS.items()]
    return "\n".join(out) + "\n"


def _register_builtins() -> None:
    # The kinds live with what they do: faults in faults.py, steps and expectations in
    # runner.py (imported here so that parsing a file knows every kind).
    from .. import faults  # noqa: F401
    from . import runner  # noqa: F401


_register_builtins()

