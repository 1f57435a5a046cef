# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint format examples docs bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples,docs,bench]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 tests

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

examples: venv
	IMPLICITDIFF_QUICK=1 $(PY) -m examples

docs: venv
	$(PY) -m mkdocs build --strict

bench: venv
	$(PY) -m benchmarks

bench-quick: venv
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) site .pytest_cache
