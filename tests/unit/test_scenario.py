"""Scenario files: built-ins are valid; mistakes are reported with file:line and the YAML path."""
import pytest

from testbed import scenario as S

BASE = """\
apiVersion: beluga.testbed/v1alpha1
kind: Scenario
name: s
roles:
  service: host0
  writers: [host1]
steps:
  - put: {on: writers, set: a, blocks: 4}
  - get: {on: readers, set: a}
expect:
  - all_readable: {set: a}
"""


def errors(text):
    with pytest.raises(S.ScenarioError) as e:
        S.parse(text, "s.yaml")
    return e.value.errors


@pytest.mark.parametrize("name", sorted(S.builtin()))
def test_builtins_parse(name):
    sc = S.load(name)
    assert sc.steps and sc.expect and sc.description


def test_base_defaults():
    sc = S.parse(BASE, "s.yaml")
    assert sc.readers == "others" and sc.topology == "4hosts-1switch"
    assert sc.block_size(sc.steps[0].size_bytes) == 65536
    assert [s.line for s in sc.steps] == [8, 9]


def test_unknown_step_did_you_mean():
    assert errors(BASE.replace("  - get: {on", "  - gte: {on")) == [
        "s.yaml:9: steps[1].gte: unknown step (did you mean 'get'? known: put, get, wait, fault, scan, stat, run, join)"]


def test_unknown_and_missing_fields():
    errs = errors(BASE.replace("{on: writers, set: a, blocks: 4}", "{on: writers, set: a, blokcs: 4}"))
    assert errs == ["s.yaml:8: steps[0].put.blokcs: unknown field (did you mean 'blocks'?)",
                    "s.yaml:8: steps[0].put: missing required field 'blocks' (how many blocks)"]


def test_wrong_type():
    assert errors(BASE.replace("blocks: 4", "blocks: four")) == [
        "s.yaml:8: steps[0].put.blocks: expected an integer, got a string"]


def test_fault_needs_exactly_one_kind_and_hang_needs_seconds():
    text = BASE.replace("  - get: {on: readers, set: a}\n",
                        "  - fault: {kill_host: host1, nic_down: host1}\n  - fault: {hang_host: host1}\n"
                        "  - fault: {poison: {set: a}}\n")
    assert errors(text) == [
        "s.yaml:9: steps[1].fault: expected exactly one fault (kill_host, hang_host, nic_down, nic_up, poison, "
        "media_event, bitflip, kill_service, start_service), got kill_host, nic_down",
        "s.yaml:10: steps[2].fault: missing required field 'seconds' (how long the host stays stopped)",
        "s.yaml:11: steps[3].fault.poison: missing required field 'index' (the block's index)"]


def test_unknown_expectation_and_roles():
    text = BASE.replace("all_readable: {set: a}", "all_readble: {set: a}").replace(
        "  writers: [host1]\n", "  writers: [host1]\n  readers: host2\n")
    assert errors(text) == [
        "s.yaml:7: roles.readers: expected a list of host names or 'others', got 'host2'",
        "s.yaml:12: expect[0].all_readble: unknown expectation (did you mean 'all_readable'? known: all_readable, "
        "no_torn_reads, never_returned, guest_saw, quarantined, no_reserved_space, evicted, exit_code, output_matches, "
        "file_written, coherence_clean)"]


def test_unknown_builtin_name():
    with pytest.raises(S.ScenarioError) as e:
        S.load("faults/writer-crsh")
    assert "did you mean 'faults/writer-crash'?" in e.value.errors[0]


def test_scenarios_are_read_by_the_safe_loader():
    text = BASE.replace("  - get: {on: readers, set: a}\n", "  - get: {on: readers, set: a, set: b}\n")
    assert errors(text) == ["s.yaml:9: steps[1].get.set: duplicate key 'set' (first at line 9)"]
    text = BASE.replace("roles:\n", "x: &a [1]\ny: *a\nroles:\n")
    errs = errors(text)
    assert errs[0] == "s.yaml:4: x: anchor '&a': anchors and aliases are not supported, write the value out"


def test_store_and_roles_of_the_wrong_type_are_located():
    text = BASE.replace("  writers: [host1]\n", "  writers: host1\nstore: {heartbeat_timeout_s: x, block_size_bytes: 0}\n")
    assert errors(text) == [
        "s.yaml:6: roles.writers: expected a list, got a string",
        "s.yaml:7: store.block_size_bytes: expected an integer from 1 to 1099511627776, got 0",
        "s.yaml:7: store.heartbeat_timeout_s: expected a number of seconds, got a string"]
