"""The shared loader and checker as another file kind (a scenario, the recipe) uses them."""
import pytest

from testbed import yamlcheck as Y
from testbed.log import TestbedError

TEXT = """\
name: s
steps:
  - put:
      on: writers
      blocks: 4
"""


def test_plain_data_and_lines_by_path():
    doc = Y.load(TEXT, "s.yaml", "scenario")
    assert doc.data == {"name": "s", "steps": [{"put": {"on": "writers", "blocks": 4}}]}
    assert doc.line(("steps", 0, "put", "blocks")) == 5
    assert doc.line(("steps", 0, "put", "absent")) == 3  # nearest parent that is there
    assert doc.line(()) == 1


def test_checker_gathers_located_errors_under_its_own_kind():
    doc = Y.load(TEXT.replace("blocks: 4", "blocks: 4\n      name: ../x\n      count: 3000000"), "s.yaml", "scenario")
    c = Y.Checker(doc, "scenario")
    put = c.mapping(doc.data["steps"][0]["put"], ("steps", 0, "put"), {"on": str, "blocks": int},
                    {"name": str, "count": int, "size": int})
    c.name(put["name"], ("steps", 0, "put", "name"))
    c.integer(put["count"], ("steps", 0, "put", "count"), 1, 1000, "a count", "the pool holds at most 1000")
    with pytest.raises(Y.ConfigError) as e:
        c.raise_errors()
    assert e.value.kind == "scenario" and isinstance(e.value, TestbedError)
    assert e.value.errors == [
        "s.yaml:6: steps[0].put.name: invalid name '../x': use lower-case letters, digits and '-', "
        "starting with a letter or digit, at most 63 characters",
        "s.yaml:7: steps[0].put.count: expected a count from 1 to 1000 (the pool holds at most 1000), got 3000000"]
    assert str(e.value).startswith("invalid scenario:\n  s.yaml:6: ")


def test_loader_errors_carry_the_kind():
    with pytest.raises(Y.ConfigError) as e:
        Y.load("a: 1\na: 2\n", "r.yaml", "image recipe")
    assert str(e.value) == "invalid image recipe:\n  r.yaml:2: a: duplicate key 'a' (first at line 1)"


def test_read_names_a_missing_file(tmp_path):
    with pytest.raises(Y.ConfigError) as e:
        Y.read(tmp_path / "none.yaml", "scenario", "none.yaml")
    assert e.value.errors == ["none.yaml: cannot read: No such file or directory"]


def test_errors_are_listed_in_each_files_order_files_as_they_came():
    """The checks find mistakes field by field; a user reads them top to bottom, as a compiler lists them."""
    from testbed.yamlcheck import ConfigError

    e = ConfigError("scenario", [
        "b.yaml:9: steps[2]: unknown action", "b.yaml: ... and 3 more errors of these kinds",
        "b.yaml:2: name: invalid name", "a.yaml:7: x: bad", "b.yaml:2: name: second on line 2", "a.yaml:1: y: bad"])
    assert e.errors == [
        "b.yaml:2: name: invalid name", "b.yaml: ... and 3 more errors of these kinds",
        "b.yaml:2: name: second on line 2", "b.yaml:9: steps[2]: unknown action", "a.yaml:1: y: bad", "a.yaml:7: x: bad"]
    assert str(e).splitlines()[1:3] == ["  b.yaml:2: name: invalid name", "  b.yaml: ... and 3 more errors of these kinds"]
