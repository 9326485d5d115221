# DeepOpt: `make run` starts everything, `make test` runs the suite. Both set up .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

setup: $(SETUP_STAMP)

# Re-installs whenever requirements.txt changes; torch==2.13.0 comes from the machine's local wheels.
$(SETUP_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(SETUP_STAMP)

# Migrate, make the admin, start Redis if needed, then web + Celery worker + beat until Ctrl-C.
run: setup
	$(PY) scripts/run.py --port $(PORT)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/api.py

clean:
	rm -rf var/ .pytest_cache .ruff_cache
