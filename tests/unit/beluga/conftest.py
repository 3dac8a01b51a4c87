"""pytest fixtures for the Beluga store tests (helpers live in beluga_store_support)."""
from beluga_store_support import pool_path, service_process, store  # noqa: F401  (fixtures)
