# The two commands: `make demo` and `make test`. Both run `make setup` first.
VENV ?= .venv
BT := $(VENV)/bin/beluga-testbed
PYTEST := $(VENV)/bin/pytest

.PHONY: setup image demo test test-unit test-integration coverage mutate clean

setup:
	@scripts/setup-host.sh

image: setup
	$(BT) image build

demo: image
	$(BT) doctor
	BT=$(BT) scripts/demo.sh

test: image
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) tests -m "not integration"

test-integration: image
	$(PYTEST) tests -m integration

# Unit line coverage of the testbed's logic (docs/testing.md has the figures).
coverage: setup
	$(VENV)/bin/python -m coverage run --source=testbed -m pytest -q tests/unit -m "not integration"
	$(VENV)/bin/python -m coverage report --include='testbed/provision.py,testbed/lifecycle.py,testbed/runner.py,testbed/cli.py,testbed/guest_pool.py'

# Mutation testing (mutmut) of the store's client, service and layout, topology validation,
# provisioning and the scenario expectations; about 55 min on a busy 2-core machine (docs/testing.md). Groups: scripts/mutate.py GROUP ...
mutate: setup
	nice -n 10 $(VENV)/bin/python scripts/mutate.py $(GROUPS)

clean:
	rm -rf $(VENV) build *.egg-info
