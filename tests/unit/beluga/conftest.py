"""pytest fixtures for the Beluga store tests (helpers live in beluga_store_support)."""
import pytest

from beluga_store_support import pool_path, service_process, store  # noqa: F401  (fixtures)


@pytest.fixture(scope="session", autouse=True)
def _orphaned_pools_removed():
    """Pools left in /dev/shm by an earlier run that was killed (its pid gone) are removed first."""
    from benchmarks.store.children import remove_orphans

    for gone in remove_orphans("/dev/shm", "beluga-test-"):
        print(f"removed {gone}, left by a killed test run")
