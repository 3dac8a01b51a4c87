"""The programs that run inside the guests, not on the host.

Each file here is copied into a guest (over fw_cfg or SFTP) and run there with the
guest's own python3 and its standard library only: nothing here imports the testbed's
host code (the store's driver imports the `beluga` package, deployed beside it, and NumPy).

* ``pool.py``  -- makes the CXL region and devdax device at boot and answers `up`'s
  verification (`python3 -S pool.py create|write|read|clear|report`);
* ``store.py`` -- the Beluga store's driver for scenarios (`put`, `get`, `stat`, ...);
* ``reset.py`` -- `beluga-testbed reset`'s guest half: stops what scenarios started,
  clears trace buffers and injected poison.

The host imports them only in unit tests.
"""
