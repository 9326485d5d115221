# DeepOpt: `make run` starts everything, `make test` runs the suite. Both set up .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
SLOTS ?= 2
NAME ?= local-2
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup run worker test docker-check lint bench clean

setup: $(SETUP_STAMP)

# Re-installs whenever requirements.txt changes; torch==2.13.0 comes from the machine's local wheels.
$(SETUP_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(SETUP_STAMP)

# Migrate, make the admin and the local node, start Redis if needed, then web + Celery worker + beat
# + the local node (its agent and worker; its GPUs, or SLOTS CPU slots) until Ctrl-C.
run: setup
	$(PY) scripts/run.py --port $(PORT) --slots $(SLOTS)

# Another local node in the foreground, reporting to the `make run` on PORT: make worker NAME=local-2 SLOTS=2
worker: setup
	$(PY) scripts/node.py --name $(NAME) --slots $(SLOTS) --port $(PORT)

test: setup
	$(PY) -m pytest

# `docker compose up` of docker/compose.yaml (tests/integration/test_compose_up.py), then the images run as
# compose runs them (test_docker_images.py): minutes; needs a Docker engine with the compose plugin. Without
# Docker Hub or PyTorch's index: DEEPOPT_DOCKER_BASE, DEEPOPT_DOCKER_WHEELS, DEEPOPT_DOCKER_TORCH_INDEX and
# DEEPOPT_DOCKER_STANDINS=1 (README, "Docker").
docker-check: setup
	DEEPOPT_DOCKER_TESTS=1 $(PY) -m pytest tests/integration/test_compose_up.py tests/integration/test_docker_images.py -v

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/api.py

clean:
	rm -rf var/ .pytest_cache .ruff_cache
