# The two set-up commands (each bootstraps .venv on a fresh machine):
#   make run   - the main job
#   make test  - lint + the whole test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bootstrap lint

bootstrap:
	@bash scripts/bootstrap.sh

run: bootstrap
	$(VENV)/bin/missrec quickstart

test: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m pytest

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
