# hetero-router: `make run` starts the embedded mock cluster and the router,
# `make test` runs the whole suite. Both install into .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench

.PHONY: install run test test-engines lint format proto proto-check monitoring lock lock-upgrade lock-check bench bench-quick clean

install: $(INSTALLED)

# Reinstalls only when the project's metadata changes.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

$(BENCH_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test,bench]'
	touch $@

run: install
	$(BIN)/hetero-router up

test: install
	$(PY) -m pytest -q

# Real vLLM (CPU build) behind the router. The first run installs the engine
# environment into ~/.cache/hetero-router/engines (about 6 minutes, 4 GB) and builds
# a tiny model there; see "Real engines" in the README.
test-engines: install
	$(PY) -m bench.engines.env
	$(PY) -m pytest -q -m engines tests/engines

lint: $(BENCH_INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Scenarios write bench/results/<scenario>.json, a PNG and SUMMARY.md.
bench-quick: $(BENCH_INSTALLED)
	$(PY) -m bench --quick

# The engines scenario needs the real-engine environment: installed first if absent.
bench: $(BENCH_INSTALLED)
	$(PY) -m bench.engines.env
	$(PY) -m bench

proto: install
	$(PY) proto/generate.py

proto-check: install
	$(PY) proto/generate.py --check

# deploy/monitoring: the rules file, the PrometheusRule and the Grafana dashboard.
monitoring: install
	$(PY) deploy/monitoring/render.py

# deploy/requirements.lock and deploy/build.lock, the image's pinned and hashed
# dependencies, from pyproject.toml (uv pip compile; needs the package index).
# `lock` keeps the pins that still fit, `lock-upgrade` takes the newest releases,
# `lock-check` fails when pyproject.toml changed and `make lock` was not run.
lock: install
	$(PY) deploy/lock.py

lock-upgrade: install
	$(PY) deploy/lock.py --upgrade

lock-check: install
	$(PY) deploy/lock.py --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
