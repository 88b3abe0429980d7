# Every target creates the virtual environment on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint typecheck unit up down status clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## create .venv and install Mayfly with its dev tools

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests functions taskpkgs bench dev
	$(BIN)/ruff format --check src tests functions taskpkgs bench dev

typecheck: $(STAMP) ## mypy --strict on src/
	$(BIN)/mypy

unit: $(STAMP) ## the tests alone, against whatever services are already up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck $(STAMP) ## lint, types, then every test with the real servers started for the run
	$(BIN)/python dev/services.py run -- $(BIN)/python -m pytest $(PYTEST_ARGS)

up: $(STAMP) ## start the real servers (Kafka, S3, Jaeger) on 127.0.0.1 and leave them running
	$(BIN)/python dev/services.py up

down: ## stop the servers that `make up` started
	@test -x $(BIN)/python && $(BIN)/python dev/services.py down || true

status: ## show which servers are running
	$(BIN)/python dev/services.py status

clean: ## remove the virtual environment and caches in the checkout
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache src/*.egg-info

.PHONY: demo
demo: $(STAMP) ## the main job: the whole pipeline on one machine, no server needed
	$(BIN)/mayfly demo
