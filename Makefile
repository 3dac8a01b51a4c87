# The two commands: `make demo` and `make test`. Both run `make setup` first.
VENV ?= .venv
BT := $(VENV)/bin/beluga-testbed
PYTEST := $(VENV)/bin/pytest

.PHONY: setup image qemu demo test test-unit test-integration coverage mutate clean

setup:
	@scripts/setup-host.sh

image: setup
	$(BT) image build

# A newer QEMU than the system's (Debian's source package plus qemu/patches/series), for
# `up --qemu`; prints the binary's path. Slow the first time (qemu/README.md), then instant.
qemu:
	@qemu/build.sh

demo: image
	$(BT) doctor
	BT=$(BT) scripts/demo.sh

# The store's tests run three times: with its C read path (required: a missing build fails
# instead of falling back), with the Python one the guests use (BELUGA_NATIVE=0), and under the
# coherence sanitizer (every process a host with a non-coherent cache: docs/coherence.md).
STORE_TESTS := tests/unit/beluga

test: image
	BELUGA_NATIVE=1 $(PYTEST) tests
	BELUGA_NATIVE=0 $(PYTEST) $(STORE_TESTS)
	BELUGA_COHERENCE=check $(PYTEST) $(STORE_TESTS)

test-unit: setup
	BELUGA_NATIVE=1 $(PYTEST) tests -m "not integration"
	BELUGA_NATIVE=0 $(PYTEST) $(STORE_TESTS)
	BELUGA_COHERENCE=check $(PYTEST) $(STORE_TESTS)

test-integration: image
	$(PYTEST) tests -m integration

# Unit line coverage of the testbed's logic (docs/testing.md has the figures).
coverage: setup
	$(VENV)/bin/python -m coverage run --source=testbed -m pytest -q tests/unit -m "not integration"
	$(VENV)/bin/python -m coverage report --include='testbed/provision.py,testbed/lifecycle.py,testbed/scenario/runner.py,testbed/cli.py,testbed/guest/pool.py'

# Mutation testing (mutmut) of the store's client, service and layout, topology validation,
# provisioning and the scenario expectations; about 55 min on a busy 2-core machine (docs/testing.md). Groups: scripts/mutate.py GROUP ...
mutate: setup
	nice -n 10 $(VENV)/bin/python scripts/mutate.py $(GROUPS)

clean:
	rm -rf $(VENV) build *.egg-info beluga/_native*.so
