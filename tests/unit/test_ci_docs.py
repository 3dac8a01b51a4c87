"""docs/ci.md's GitHub Actions workflow parses, and every `beluga-testbed` command in it
exists in the CLI with the options it is given (argparse parses it)."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from testbed import cli

DOC = Path(__file__).parents[2] / "docs" / "ci.md"


def workflow() -> dict:
    text = DOC.read_text()
    block = text[text.index("<!-- workflow: begin -->"):text.index("<!-- workflow: end -->")]
    return yaml.safe_load(block.split("```yaml\n", 1)[1].rsplit("```", 1)[0])


def commands() -> list[list[str]]:
    """Every `$BT ...` / `beluga-testbed ...` command line in the workflow's run steps,
    with shell variables and substitutions replaced by a placeholder (a valid name: the CLI checks names)."""
    out = []
    for job in workflow()["jobs"].values():
        for step in job["steps"]:
            text = step.get("run", "")
            inner = re.findall(r"\$\(([^()]*)\)", text)  # commands inside $(...) count too
            for line in text.splitlines() + inner:
                line = re.sub(r'"\$\(.*?\)"|\$\(.*?\)', "x1", line)
                line = re.sub(r"\$\{?\w+\}?(?<!BT)", "x1", line.replace("$BT", "beluga-testbed"))
                for m in re.finditer(r"beluga-testbed ([^;|&]*)", line):
                    words = shlex.split(m.group(1).split(" >")[0])
                    out.append([w for w in words if w not in ("then",)])
    return out


def test_workflow_parses_and_uses_the_cli():
    wf = workflow()
    job = wf["jobs"]["scenarios"]
    assert wf["name"] == "cxl-scenarios" and job["container"]["image"] == "debian:12"
    assert "--shm-size" in job["container"]["options"]  # the pools live in /dev/shm
    cmds = commands()
    assert {c[0] for c in cmds} >= {"image", "scenario", "up", "run", "logs", "down"}
    uses = [s.get("uses", "") for s in wf["jobs"]["scenarios"]["steps"]]
    assert any(u.startswith("actions/cache@") for u in uses) and any(u.startswith("actions/upload-artifact@")
                                                                     for u in uses)


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a[:2]))
def test_every_command_in_the_workflow_exists(argv):
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: unknown command or option
        pytest.fail(f"`beluga-testbed {' '.join(argv)}` does not parse (exit {e.code})")


def test_the_check_catches_a_command_that_does_not_exist():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["image", "hash"])


def test_image_key_is_the_recipes_hash(capsys):
    from testbed import image
    assert cli.main(["image", "key"]) == 0
    key = capsys.readouterr().out.strip()
    assert key == image.recipe_key() and re.fullmatch(r"[0-9a-f]{16}", key)
