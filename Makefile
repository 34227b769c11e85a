# hetero-router: `make run` starts the embedded mock cluster and the router,
# `make test` runs the whole suite. Both install into .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
INSTALLED := $(VENV)/.installed

.PHONY: install run test lint format proto proto-check clean

install: $(INSTALLED)

# Reinstalls only when the project's metadata changes.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

run: install
	$(BIN)/hetero-router up

test: install
	$(PY) -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: install
	$(PY) proto/generate.py

proto-check: install
	$(PY) proto/generate.py --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
