# Two commands on a fresh machine: `make demo` and `make test`. Each installs only
# what it needs into .venv: the package alone for the demo, plus one extra per target
# (test, examples, docs, bench), each installed once (a stamp file per extra).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITE_PORT ?= 8000

.PHONY: venv demo test test-as-users lint format examples docs serve bench bench-quick clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.extra-%: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# Everything (what CI uses).
venv: $(VENV)/.extra-test $(VENV)/.extra-examples $(VENV)/.extra-docs $(VENV)/.extra-bench

demo: $(VENV)/.base
	$(PY) examples/quickstart.py

test: $(VENV)/.extra-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 tests

# The tests where code generation could matter (large sizes, NaN in reductions,
# memory), compiled exactly as users compile: `make test` compiles for speed
# (tests/conftest.py).
test-as-users: $(VENV)/.extra-test
	IMPLICITDIFF_TEST_AS_USERS=1 $(PY) -m pytest -n 2 -m full_optimisation tests

lint: $(VENV)/.extra-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.extra-test
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

examples: $(VENV)/.extra-examples
	IMPLICITDIFF_QUICK=1 $(PY) -m examples

docs: $(VENV)/.extra-docs
	$(PY) -m mkdocs build --strict

# The site over HTTP (its search needs it): http://localhost:$(SITE_PORT)/
serve: docs
	$(PY) -m http.server $(SITE_PORT) --directory site

bench: $(VENV)/.extra-bench
	$(PY) -m benchmarks

bench-quick: $(VENV)/.extra-bench
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) site .pytest_cache
