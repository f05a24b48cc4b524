# The two set-up commands (each bootstraps .venv on a fresh machine):
#   make run   - the main job
#   make test  - lint + the whole test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bootstrap bootstrap-test lint

bootstrap:
	@bash scripts/bootstrap.sh

bootstrap-test:  # the test bootstrap: also a Chromium for the console's browser tests (never for `make run`)
	@bash scripts/bootstrap.sh --browser

run: bootstrap
	$(VENV)/bin/missrec quickstart

test: bootstrap-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m pytest

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
