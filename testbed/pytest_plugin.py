"""pytest plugin (entry point `beluga_testbed`): a real testbed as a fixture.

    def test_pool_is_shared(testbed):                 # function scope: reset before each test
        testbed.exec_ok("host0", ["true"])

    pytest --beluga-topology 2hosts-1switch [--beluga-keep] [--beluga-share DIR[:GUEST[:rw]]]
           [--beluga-kernel PATH [--beluga-initrd PATH] [--beluga-modules DIR]] [--beluga-qemu PATH]

Nothing boots unless a test asks for `testbed` or `testbed_session`: the plugin is loaded
into every pytest run of an environment that has beluga-testbed installed. The session
fixture brings one testbed up for the whole run (or, when one of that name is already
up, e.g. left by --beluga-keep, takes it and resets it); `testbed` resets it before every
test but the first after `up`, so each test starts from the state right after `up`. A
test that kills a host leaves a testbed that reset cannot repair: the next test gets a
fresh one (down and up). Under pytest-xdist each worker has its own testbed, named
`<name>-<worker id>` (gw0, gw1, ...).

--beluga-kernel, --beluga-initrd, --beluga-modules and --beluga-qemu boot a user's kernel
and QEMU, as `up --kernel/--initrd/--modules/--qemu` (over the topology's `kernel:`
fields); a testbed of that name that is already up must run the same ones.

The testbed's name is --beluga-name, else `pytest-<topology name>`. State and pool files
go where BELUGA_TESTBED_STATE and BELUGA_TESTBED_POOLS say (as for the CLI).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DEFAULT_TOPOLOGY = "2hosts-1switch"
KERNEL_FIELDS = ("kernel", "initrd", "modules", "qemu")  # testbed/kernel.py's FIELDS (imported lazily there)


class BelugaResetWarning(UserWarning):
    """A reset between tests could not undo everything (listed in the message)."""


@dataclass(frozen=True)
class Options:
    topology: str = DEFAULT_TOPOLOGY
    name: str | None = None
    keep: bool = False
    shares: tuple[str, ...] = field(default=())
    kernel: str | None = None
    initrd: str | None = None
    modules: str | None = None
    qemu: str | None = None

    @classmethod
    def from_config(cls, config) -> Options:
        return cls(topology=config.getoption("beluga_topology") or DEFAULT_TOPOLOGY,
                   name=config.getoption("beluga_name"), keep=bool(config.getoption("beluga_keep")),
                   shares=tuple(config.getoption("beluga_share") or ()),
                   **{f: config.getoption(f"beluga_{f}") for f in KERNEL_FIELDS})

    def up_kwargs(self) -> dict:
        """What Testbed.up takes from these options."""
        return {"shares": list(self.shares),
                **{f: getattr(self, f) for f in KERNEL_FIELDS if getattr(self, f) is not None}}


def pytest_addoption(parser) -> None:
    g = parser.getgroup("beluga-testbed", "beluga-testbed (fixtures testbed, testbed_session)")
    g.addoption("--beluga-topology", default=None, metavar="TOPOLOGY",
                help=f"topology of the testbed fixtures: a built-in name or a YAML file (default {DEFAULT_TOPOLOGY})")
    g.addoption("--beluga-name", default=None, metavar="NAME",
                help="testbed name (default pytest-<topology name>; '-<worker id>' is added under xdist)")
    g.addoption("--beluga-keep", action="store_true", default=False,
                help="leave the testbed up after the run (a later run with the same name resets and reuses it)")
    g.addoption("--beluga-share", action="append", default=[], metavar="HOST_DIR[:GUEST_DIR[:rw]]",
                help="mount a host folder in every guest (as 'up --share'); repeatable")
    g.addoption("--beluga-kernel", default=None, metavar="PATH",
                help="boot this kernel, a bzImage or vmlinux (as 'up --kernel'; over the topology's kernel.kernel)")
    g.addoption("--beluga-initrd", default=None, metavar="PATH", help="with a kernel: this initrd (as 'up --initrd')")
    g.addoption("--beluga-modules", default=None, metavar="DIR",
                help="with a kernel: its `make modules_install INSTALL_MOD_PATH=DIR` tree (as 'up --modules')")
    g.addoption("--beluga-qemu", default=None, metavar="PATH", help="this QEMU binary (as 'up --qemu')")


def _topology_stem(topology: str) -> str:
    """A name part from a topology reference: its file stem, in the name rule's alphabet."""
    stem = Path(topology).stem if topology.endswith((".yaml", ".yml")) else topology
    return re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-") or "testbed"


def choose_name(opts: Options, worker_id: str | None) -> str:
    """The testbed name of this pytest process: --beluga-name (else pytest-<topology>),
    plus '-<worker id>' under xdist, so that workers never share a testbed. Checked by
    the name rule (testbed/names.py)."""
    from . import names
    base = opts.name if opts.name is not None else f"pytest-{_topology_stem(opts.topology)}"[:50].rstrip("-")
    if worker_id and worker_id != "master":
        base = f"{base}-{worker_id.lower()}"
    return names.check(base, "--beluga-name (with the xdist worker id)" if opts.name else "testbed name")


def _worker_id(config) -> str | None:
    """xdist's worker id (gw0, ...) in a worker process, None otherwise."""
    wi = getattr(config, "workerinput", None)
    return wi.get("workerid") if wi else None


def _testbed_class():
    """The API's Testbed, imported on first use (the unit tests put a fake here)."""
    from .api import Testbed
    return Testbed


def _kernel_differences(name: str, opts: Options) -> list[str]:
    """How the running testbed `name` differs from the kernel and QEMU options given."""
    if not any(getattr(opts, f) for f in KERNEL_FIELDS):
        return []
    from . import lifecycle
    from .kernel import UserKernel, differences
    given = UserKernel(**{f: Path(getattr(opts, f)) if getattr(opts, f) else None for f in KERNEL_FIELDS})
    return differences(lifecycle.status(name).get("kernel"), given)


class Session:
    """The testbed of one pytest process, and whether it needs a reset before the next test."""

    def __init__(self, opts: Options, name: str) -> None:
        self.opts = opts
        self.name = name
        self.tb = None
        self.started = False  # this process brought it up (else it was up already)
        self.dirty = False

    def start(self):
        Testbed = _testbed_class()
        if self.name in Testbed.running():
            tb = Testbed.attach(self.name)
            from .log import TestbedError
            from .topology import load
            want = load(self.opts.topology).name
            if tb.topology != want:
                raise TestbedError(f"testbed '{self.name}' is up with topology '{tb.topology}', not '{want}'",
                                   hint=f"'beluga-testbed down {self.name}', or another --beluga-name")
            if diff := _kernel_differences(self.name, self.opts):
                raise TestbedError(f"testbed '{self.name}' is up with another kernel or QEMU: " + "; ".join(diff),
                                   hint=f"'beluga-testbed down {self.name}', or another --beluga-name")
            self.tb = tb
            self.dirty = True  # left by an earlier run: reset before the first test
        else:
            self.tb = Testbed.up(self.opts.topology, name=self.name, keep=True, **self.opts.up_kwargs())
            self.started = True
        return self.tb

    def fresh(self):
        """The testbed, reset if a test had it since `up` or the last reset; brought up
        again if the reset could not bring back a host (a test killed one)."""
        if self.dirty:
            report = self.tb.reset()
            if not all(self.tb.alive(h) for h in self.tb.hosts):
                self.tb.down()
                # The same object (testbed_session's value) now stands for the new one.
                self.tb._adopt(_testbed_class().up(self.opts.topology, name=self.name, keep=True,
                                                   **self.opts.up_kwargs()))
                self.started = True
            elif not report.complete:
                warnings.warn(BelugaResetWarning(f"reset of '{self.name}' could not undo: "
                                                 + "; ".join(report.not_undone)), stacklevel=1)
            self.dirty = False
        return self.tb

    def finish(self) -> None:
        if self.tb is not None and not self.opts.keep:
            self.tb.down()


@pytest.fixture(scope="session")
def testbed_session(request):
    """One running testbed for the whole session (per xdist worker), as it was left by the
    tests before: use `testbed` for a reset one."""
    from .log import TestbedError
    from .topology import TopologyError
    opts = Options.from_config(request.config)
    s = None
    try:
        s = Session(opts, choose_name(opts, _worker_id(request.config)))
        request.config.stash[_SESSION] = s
        s.start()
        why = None
    except TestbedError as e:
        why = str(e)
    except TopologyError as e:
        why = "invalid topology:\n" + "\n".join(f"  {x}" for x in e.errors)
    try:
        if why is not None:  # outside the except: no "during handling of the above" chain
            pytest.fail(f"beluga-testbed: {why}", pytrace=False)
        yield s.tb
    finally:
        if s is not None:
            s.finish()


@pytest.fixture
def testbed(request, testbed_session):
    """The session's testbed, reset to its state right after `up` before this test (not
    before the first test after `up`: nothing ran on it yet)."""
    from .log import TestbedError
    s: Session = request.config.stash[_SESSION]
    try:
        return s.fresh()
    except TestbedError as e:
        why = str(e)
    pytest.fail(f"beluga-testbed: {why}", pytrace=False)


def pytest_runtest_teardown(item) -> None:
    """A test that had the testbed (either fixture) may have changed it."""
    s = item.config.stash.get(_SESSION, None)
    if s is not None and "testbed_session" in getattr(item, "fixturenames", ()):
        s.dirty = True


_SESSION = pytest.StashKey[Session]()
