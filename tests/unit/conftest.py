"""Unit tests check topologies against one fixed machine, not the one they run on, so
the messages that name its cores, RAM and pool space read the same everywhere."""
import pytest

from testbed import topology

MACHINE = topology.Machine(cpus=4, memory_mib=8192, pools_fs="/dev/shm", pools_fs_mib=4096)


@pytest.fixture(autouse=True)
def _fixed_machine(monkeypatch):
    monkeypatch.setattr(topology, "this_machine", lambda: MACHINE)
