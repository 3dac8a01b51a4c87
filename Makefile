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

# The store's tests run twice: with its C read path (required: a missing build fails
# instead of falling back) and with the Python one the guests use (BELUGA_NATIVE=0).
STORE_TESTS := tests/unit/beluga

test: image
	BELUGA_NATIVE=1 $(PYTEST) tests
	BELUGA_NATIVE=0 $(PYTEST) $(STORE_TESTS)

test-unit: setup
	BELUGA_NATIVE=1 $(PYTEST) tests -m "not integration"
	BELUGA_NATIVE=0 $(PYTEST) $(STORE_TESTS)

test-integration: image
	$(PYTEST) tests -m integration

clean:
	rm -rf $(VENV) build *.egg-info beluga/_native*.so
