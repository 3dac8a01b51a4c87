"""beluga-testbed: emulated CXL memory pools shared by QEMU hosts.

`from testbed import Testbed` is the library's entry point (testbed/api.py, docs/api.md).
It is imported on first use: `import testbed` alone stays cheap (the pytest plugin,
loaded into every pytest run, imports this package).
"""

__all__ = ["Testbed", "TestbedError"]


def __getattr__(name: str):
    if name == "Testbed":
        from .api import Testbed
        return Testbed
    if name == "TestbedError":
        from .log import TestbedError
        return TestbedError
    raise AttributeError(f"module 'testbed' has no attribute {name!r}")
