"""The command line is a thin layer over the public API: everything it does with running
testbeds goes through testbed/api.py (`Testbed`), so a script can do all that the CLI
does. Held here by what cli.py imports of the project, read from its syntax tree."""
from __future__ import annotations

import ast
from pathlib import Path

import testbed.cli

# What cli.py may import of the project: the API for running testbeds, and the parts that
# have nothing to do with one (images, topologies, scenarios, the machine check).
ALLOWED = {"api", "image", "names", "log", "doctor", "topology", "scenario", "scenario.runner", "yamlcheck"}


def project_imports(path: Path) -> dict[str, int]:
    """Every module of the package that `path` imports (relative or as testbed.X), with a line."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import a, b
                for a in node.names:
                    out.setdefault(a.name, node.lineno)
            elif node.level == 1:
                out.setdefault(node.module, node.lineno)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "testbed":
                mod = node.module.removeprefix("testbed").lstrip(".")
                for a in node.names if not mod else [None]:
                    out.setdefault(mod or a.name, node.lineno)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "testbed":
                    out.setdefault(a.name.removeprefix("testbed").lstrip(".") or "testbed", node.lineno)
    return out


def test_the_cli_imports_nothing_of_running_testbeds_but_the_api():
    path = Path(testbed.cli.__file__)
    got = project_imports(path)
    beyond = {m: line for m, line in got.items() if m not in ALLOWED}
    assert beyond == {}, "\n".join(f"{path.name}:{line}: imports testbed.{m}; go through api.Testbed"
                                   for m, line in sorted(beyond.items(), key=lambda x: x[1]))
    assert "api" in got


def test_the_check_sees_each_form_of_import(tmp_path):
    f = tmp_path / "cli.py"
    f.write_text("from . import lifecycle, names\nfrom .ssh import run\nimport testbed.qmp\n"
                 "from testbed import provision\nfrom testbed.state import TestbedState\n"
                 "def f():\n    from . import transfer\n")
    assert set(project_imports(f)) == {"lifecycle", "names", "ssh", "qmp", "provision", "state", "transfer"}
