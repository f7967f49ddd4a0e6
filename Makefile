# The single entry point for routine work. `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format clean bench screenshots

$(STAMP): pyproject.toml examples/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]' -e ./examples
	touch $(STAMP)

install: $(STAMP)

run: install  ## serve the example fetchers on the in-memory store at http://127.0.0.1:8000
	$(BIN)/eagercache serve

# Three worker processes: each starts its own servers (redis-server, a cluster, sentinels) on free ports. The
# fault tests (kill -9, failovers, reshards, skewed clocks) then run alone, in one process: their bounds on
# refresh gaps and rates hold on 2 cores, not beside two other workers' load.
TEST_WORKERS ?= 3

test: lint  ## lint, then the whole suite (starts its own servers); TEST_WORKERS=0 runs it all in one process
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not fault"
	$(BIN)/pytest -m fault

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache src/*.egg-info examples/*.egg-info

bench: install  ## benchmarks -> docs/benchmarks.md (BENCH_QUICK=1: ~2-minute smoke run); see bench/config.py
	bench/setup.sh $(BIN)
	$(BIN)/python -m bench.run

screenshots: install  ## docs/status-page.png and docs/status-page-phone.png: the status page in headless Chromium
	$(BIN)/python -m tests.screenshots
