# The two commands: `make demo` and `make test`. Both run `make setup` first.
VENV ?= .venv
BT := $(VENV)/bin/beluga-testbed
PYTEST := $(VENV)/bin/pytest

.PHONY: setup image demo test test-unit test-integration clean

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

clean:
	rm -rf $(VENV) build *.egg-info
