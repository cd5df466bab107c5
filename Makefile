# The two commands a newcomer needs: `make up` (run Postflow) and `make test`.
# Both install what they need into .venv first, from the package registry only.

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install up test test-slow test-slow-sample lint format record-histories clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

up: install
	$(BIN)/postflow up

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

# The slow kinds CI runs on every submission besides `make test`'s quick fault variants:
# a pause surviving restarts of worker and dev server, and a worker killed mid-burst.
test-slow-sample: install
	POSTFLOW_BURST=300 $(BIN)/python -m pytest -m slow \
		-k "scope_pause_survives_restarts or killing_a_worker_mid_burst"

# Re-record the replay corpus (tests/histories/*.json) from the representative tests.
record-histories: install
	POSTFLOW_RECORD_HISTORIES=1 $(BIN)/python -m pytest -q -k "not replay"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf var .pytest_cache .ruff_cache
