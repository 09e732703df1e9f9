# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when it is missing.
# `make demo DEMO_ARGS=--postgres` keeps Airflow's metadata in a PostgreSQL cluster of the demo's own.
# `make demo DEMO_ARGS="--postgres --schedulers 2"` runs two schedulers on it (Airflow's HA topology).
# `make demo DEMO_ARGS=--serve` keeps Airflow running after the demo, for a look at its Routing page.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench browser clean

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

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The browser the Routing page's test drives: Debian's chromium and its driver, installed only when missing.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "make browser: chromium and chromedriver are missing; install them with your system's packages" >&2; \
		exit 1; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
		echo "make browser: chromium and chromedriver are missing; as root, run:" \
			"apt-get update && apt-get install -y --no-install-recommends $(BROWSER_PACKAGES)" >&2; \
		exit 1; \
	fi; \
	echo "make browser: installing $(BROWSER_PACKAGES)"; \
	$$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES)

bench: $(STAMP)
	$(PY) benchmarks/policy_decisions.py

clean:
	rm -rf $(VENV) build *.egg-info demo-output
