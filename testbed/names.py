"""The one rule for every name and id the user gives: testbed names, host names, device,
port, bridge, switch and window ids in topologies, step and role names in scenarios.

They become folder and file names (`<state>/<name>/`, `<pools>/<name>/<device>.raw`) and
QEMU option values (`-object memory-backend-file,id=<device>-mem,...`). `..`, `/` or a
comma in one of them deleted folders outside the testbed and injected QEMU options, so
the pattern admits nothing that means anything to a path or to QEMU's option parser.
"""
from __future__ import annotations

import re

from .log import TestbedError

MAX_LEN = 63
PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
RULE = f"lower-case letters, digits and '-', starting with a letter or digit, at most {MAX_LEN} characters"


def problem(value: object) -> str | None:
    """Why `value` is not a valid name, or None when it is one."""
    if not isinstance(value, str):
        return f"expected a name ({RULE}), got {type(value).__name__}"
    if not PATTERN.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        return f"invalid name {shown!r}: use {RULE}"
    return None


def check(value: str, what: str = "name") -> str:
    """`value` if it is a valid name; else a TestbedError naming `what` (for the CLI)."""
    if (why := problem(value)) is not None:
        raise TestbedError(f"{what}: {why}",
                           hint=f"for example '{_suggest(value) or 'my-testbed'}'")
    return value


def _suggest(value: object) -> str:
    if not isinstance(value, str):
        return ""
    s = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    return s[:MAX_LEN].rstrip("-")
