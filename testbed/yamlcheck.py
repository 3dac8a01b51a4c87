"""Configuration files the user writes (topologies, scenarios, the image recipe): YAML read
safely into plain data that remembers the line of every value, and one checker that
gathers every mistake as `file:line: yaml.path: message`.

Loading (`load(text, file, kind)` or `read(path, kind)`) returns a `Doc`:

    doc = yamlcheck.read(Path("my.yaml"), "scenario")   # or load(text, "my.yaml", "scenario")
    doc.data                  # dict / list / str / int / float / bool / None, nothing else
    doc.line(("steps", 2, "put"))   # 1-based line of that value (of its nearest parent if absent)

It refuses, with a located `ConfigError(kind, errors)`, what a hostile or mistaken file
could use to hang, exhaust or crash the loader, or to mean something silently:

- a file over MAX_BYTES, bytes that are not UTF-8, YAML syntax errors, several documents;
- anchors and aliases (`&a`, `*a`): a 916-byte file of nested aliases expands to a
  billion values and took 6.4 s (six levels: 71 s), and `&a [*a]` refers to itself.
  None of our files needs them, so they are refused where they stand;
- duplicate keys (YAML loaders silently keep the last one): `duplicate key 'x' (first at line N)`;
- keys that are lists or mappings; nesting deeper than MAX_DEPTH;
- tags other than the plain scalar ones (`!!python/...`, `!!set`, ...).

Checking (`Checker(doc)`): `c.err(path, msg)` records `file:line: path: msg`;
`c.mapping(value, path, required, optional)` checks a mapping's keys (unknown ones with
did-you-mean, missing required ones) and value types, and returns the fields that are
well typed; `c.name(value, path)` applies testbed/names.py; `c.integer(...)` checks a
range and says why the bound is there. Nothing raises until `c.raise_errors()`, so a user
sees every mistake at once. Paths are tuples of keys and list indexes, shown as
`hosts[2].memory_mib`.

`ConfigError` is a TestbedError: the CLI prints it as `✗ invalid <kind>:` followed by one
indented line per error.
"""
from __future__ import annotations

import datetime
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from . import names
from .log import TestbedError

MAX_BYTES = 256 << 10   # a topology or scenario is a few kilobytes
MAX_DEPTH = 32          # ours nest at most 7 levels
MAX_LOAD_ERRORS = 20    # a file of 10,000 aliases need not print 10,000 lines

# Fast and the same events as the pure-Python parser; the wheel of PyYAML bundles libyaml.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}


_LINE = re.compile(r"([^\n]*?):(\d+): ")


def _in_file_order(errors: list[str]) -> list[str]:
    """Errors that name a line (`FILE:LINE: ...`) sorted by it within their file, as a compiler
    lists them (the checks find them in another order); files stay in the order they came
    (`scenario validate` gathers several). The others (about a whole file, "... and N more")
    keep their places; errors on one line keep theirs among themselves."""
    lined = [(i, m) for i, e in enumerate(errors) if (m := _LINE.match(e))]
    files: dict[str, int] = {}
    for _, m in lined:
        files.setdefault(m.group(1), len(files))
    ordered = sorted((m for _, m in lined), key=lambda m: (files[m.group(1)], int(m.group(2))))
    out = list(errors)
    for (i, _), m in zip(lined, ordered):
        out[i] = m.string
    return out


class ConfigError(TestbedError):
    """Every mistake found in one configuration file (`kind`: "topology", "scenario", ...)."""

    def __init__(self, kind: str, errors: list[str], *, hint: str | None = None) -> None:
        errors = _in_file_order(errors)
        super().__init__(f"invalid {kind}:\n" + "\n".join(f"  {e}" for e in errors), hint=hint)
        self.kind = kind
        self.errors = errors


class _Fatal(Exception):
    """Stops the load at once (too deep): the rest of the file is not read."""


class Doc:
    """Plain data from one YAML document plus the line of every value, by path."""

    def __init__(self, file: str, data: Any, lines: dict[tuple, int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines

    def line(self, path: tuple) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)


def read(path: Path, kind: str, shown: str | None = None) -> Doc:
    """Load the file at `path` (at most MAX_BYTES are read); errors name it as `shown`."""
    shown = shown or str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(kind, [f"{shown}: cannot read: {e.strerror or e}"]) from None
    return load(raw, shown, kind)


def load(text: str | bytes, file: str, kind: str) -> Doc:
    """Parse one YAML document safely (see the module docstring); ConfigError if it cannot be."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_BYTES:
        raise ConfigError(kind, [f"{file}: more than {MAX_BYTES} bytes: a {kind} file is a few kilobytes"])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text[:e.start].count(b"\n") + 1
            raise ConfigError(kind, [f"{file}:{line}: not UTF-8 text (byte {e.start})"]) from None
    return _Walk(file, kind, text).doc()


def _python_parser_error(text: str, e: yaml.YAMLError) -> yaml.YAMLError:
    """The pure-Python parser's account of a syntax error: libyaml places 'a: [' on line 2
    (where the input ended), the Python parser on line 1 with the open bracket."""
    if _Loader is yaml.SafeLoader:
        return e
    try:
        p = yaml.SafeLoader(text)  # its reader checks every character here
        while p.check_event():
            p.get_event()
    except yaml.YAMLError as py:
        return py
    return e


class _Walk:
    """Builds plain data from parser events, so nothing is expanded or constructed that
    was not checked first (yaml.compose would resolve aliases into shared nodes)."""

    def __init__(self, file: str, kind: str, text: str) -> None:
        self.file, self.kind, self.text = file, kind, text
        self.p: Any = None
        self.lines: dict[tuple, int] = {}
        self.errors: list[str] = []

    def doc(self) -> Doc:
        try:
            try:
                self.p = _Loader(self.text)
                self.p.get_event()  # StreamStart
                data = None
                if not self.p.check_event(yaml.StreamEndEvent):
                    self.p.get_event()  # DocumentStart
                    data = self.node((), 0)
                    self.p.get_event()  # DocumentEnd
                    if not self.p.check_event(yaml.StreamEndEvent):
                        ev = self.p.peek_event()
                        self.errors.append(f"{self.file}:{ev.start_mark.line + 1}: expected one YAML document, "
                                           "found a second one ('---')")
            except yaml.YAMLError as e:
                self.errors.append(self.syntax_error(_python_parser_error(self.text, e)))
            except _Fatal:
                pass
        finally:
            if self.p is not None:
                self.p.dispose()
        if self.errors:
            if len(self.errors) > MAX_LOAD_ERRORS:
                self.errors[MAX_LOAD_ERRORS:] = [f"{self.file}: ... and {len(self.errors) - MAX_LOAD_ERRORS} "
                                                 "more errors of these kinds"]
            raise ConfigError(self.kind, self.errors)
        return Doc(self.file, data, self.lines)

    def syntax_error(self, e: yaml.YAMLError) -> str:
        if isinstance(e, yaml.reader.ReaderError):
            line = self.text[:e.position].count("\n") + 1
            ch = f" (character {e.character:#06x})" if isinstance(e.character, int) else ""
            return f"{self.file}:{line}: not valid YAML: {e.reason}{ch}"
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        return f"{self.file}{line}: not valid YAML: {getattr(e, 'problem', None) or e}"

    def err(self, ev: yaml.Event, path: tuple, msg: str) -> None:
        self.errors.append(f"{self.file}:{ev.start_mark.line + 1}: {fmt_path(path)}: {msg}")

    def node(self, path: tuple, depth: int) -> Any:
        ev = self.p.get_event()
        # A key's own line wins over its value's (a list value starts a line later).
        self.lines.setdefault(path, ev.start_mark.line + 1)
        if isinstance(ev, yaml.AliasEvent):
            self.err(ev, path, f"alias '*{ev.anchor}': anchors and aliases are not supported, write the value out")
            return None
        if ev.anchor is not None:
            self.err(ev, path, f"anchor '&{ev.anchor}': anchors and aliases are not supported, write the value out")
        if isinstance(ev, yaml.ScalarEvent):
            return self.scalar(ev, path)
        if depth >= MAX_DEPTH:
            self.err(ev, path, f"nested more than {MAX_DEPTH} levels deep")
            raise _Fatal
        if ev.tag not in (None, "!", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"):
            self.err(ev, path, f"tag '{_shown_tag(ev.tag)}' is not supported")
        if isinstance(ev, yaml.SequenceStartEvent):
            items: list = []
            while not self.p.check_event(yaml.SequenceEndEvent):
                items.append(self.node(path + (len(items),), depth + 1))
            self.p.get_event()
            return items
        out: dict = {}
        while not self.p.check_event(yaml.MappingEndEvent):
            kev = self.p.peek_event()
            if not isinstance(kev, yaml.ScalarEvent) or kev.anchor is not None:
                what = {yaml.SequenceStartEvent: "a list", yaml.MappingStartEvent: "a mapping",
                        yaml.AliasEvent: f"the alias '*{kev.anchor}'"}.get(type(kev), f"the anchor '&{kev.anchor}'")
                self.err(kev, path, f"expected a plain key, got {what}")
                self.skip(depth + 1)
                self.skip(depth + 1)
                continue
            self.p.get_event()
            key = kev.value
            kpath = path + (key,)
            if key in out:
                self.err(kev, kpath, f"duplicate key '{key}' (first at line {self.lines[kpath]})")
                self.skip(depth + 1)
                continue
            self.lines[kpath] = kev.start_mark.line + 1
            out[key] = self.node(kpath, depth + 1)
        self.p.get_event()
        return out

    def skip(self, depth: int) -> None:
        """Consume one node's events without building anything (a bad key, a duplicate's value)."""
        open_ = 0
        while True:
            ev = self.p.get_event()
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                open_ += 1
                if depth + open_ > MAX_DEPTH:
                    self.err(ev, (), f"nested more than {MAX_DEPTH} levels deep")
                    raise _Fatal
            elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                open_ -= 1
            if open_ == 0:
                return

    def scalar(self, ev: yaml.ScalarEvent, path: tuple) -> Any:
        tag = ev.tag
        if tag is None or tag == "!":
            tag = self.p.resolve(yaml.ScalarNode, ev.value, ev.implicit)
        elif tag not in _PLAIN_TAGS:
            self.err(ev, path, f"tag '{_shown_tag(tag)}' is not supported")
            return None
        node = yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, ev.style)
        try:
            return self.p.yaml_constructors[tag](self.p, node)
        except (yaml.YAMLError, ValueError, OverflowError):
            # int('9' * 5000) raises ValueError: Python limits the digits it converts.
            what = {"int": "an integer", "float": "a number", "timestamp": "a date"}.get(tag.rsplit(":", 1)[-1])
            self.err(ev, path, f"cannot read {_short(ev.value)} as {what or _shown_tag(tag)}")
            return None


def _shown_tag(tag: str) -> str:
    """As the user writes it: 'tag:yaml.org,2002:binary' is '!!binary'."""
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


# ---------------------------------------------------------------- checking

def fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top)"


def typename(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
            float: "a number", type(None): "nothing", datetime.date: "a date",
            datetime.datetime: "a date and time"}.get(type(v), type(v).__name__)


def typename_of(t: type) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer"}.get(t, t.__name__)


def did_you_mean(value: object, known: list[str] | set[str] | dict) -> str:
    """"did you mean 'x'? " or "" (to put before a list of what is known)."""
    close = difflib.get_close_matches(str(value), list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


class Checker:
    """Gathers every error of one Doc; `raise_errors()` raises them all at once."""

    def __init__(self, doc: Doc, kind: str = "configuration") -> None:
        self.doc = doc
        self.kind = kind
        self.errors: list[str] = []

    def err(self, path: tuple, msg: str) -> None:
        self.errors.append(f"{self.doc.file}:{self.doc.line(path)}: {fmt_path(path)}: {msg}")

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigError(self.kind, self.errors)

    def mapping(self, value: Any, path: tuple, required: dict[str, type], optional: dict[str, type]) -> dict | None:
        """The well-typed fields of a mapping (None if `value` is no mapping); errors for
        unknown keys (did-you-mean), missing required ones and values of the wrong type.
        A type of `int` means an integer and not a boolean; `object` accepts anything."""
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {typename(value)}")
            return None
        known = {**required, **optional}
        for k in value:
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
                self.err(path + (k,), f"unknown key{hint}")
        for k in required:
            if k not in value:
                self.err(path, f"missing required key '{k}'")
        ok = {}
        for k, typ in known.items():
            if k in value:
                v = value[k]
                if typ is int and (not isinstance(v, int) or isinstance(v, bool)):
                    self.err(path + (k,), f"expected an integer, got {typename(v)} {_short(v)}")
                elif typ is not int and not isinstance(v, typ):
                    self.err(path + (k,), f"expected {typename_of(typ)}, got {typename(v)}")
                else:
                    ok[k] = v
        return ok

    def name(self, value: Any, path: tuple) -> bool:
        """Whether `value` is a valid name or id (testbed/names.py); an error if not."""
        why = names.problem(value)
        if why is not None:
            self.err(path, why)
        return why is None

    def integer(self, value: int, path: tuple, lo: int, hi: int, what: str, why_hi: str = "") -> bool:
        """Whether lo <= value <= hi; else 'expected <what> from lo to hi (<why_hi>), got value'."""
        if lo <= value <= hi:
            return True
        why = f" ({why_hi})" if why_hi else ""
        self.err(path, f"expected {what} from {lo} to {hi}{why}, got {value}")
        return False


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
