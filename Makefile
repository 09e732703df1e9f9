# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when it is missing.
# `make demo DEMO_ARGS=--postgres` keeps Airflow's metadata in a PostgreSQL cluster of the demo's own.
# `make demo DEMO_ARGS="--postgres --schedulers 2"` runs two schedulers on it (Airflow's HA topology).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m devtools.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/policy_decisions.py

clean:
	rm -rf $(VENV) build *.egg-info demo-output
