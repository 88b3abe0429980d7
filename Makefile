# Every target creates the virtual environment on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint typecheck unit up down status clean cluster-test cluster-up

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## create .venv and install Mayfly with its dev tools

lint: $(STAMP) ## ruff lint and format check, and the import layering of src/mayfly
	$(BIN)/ruff check src tests functions taskpkgs bench dev
	$(BIN)/ruff format --check src tests functions taskpkgs bench dev
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP) ## mypy --strict on src/
	$(BIN)/mypy

unit: $(STAMP) ## the tests alone, against whatever services are already up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck $(STAMP) ## lint, types, then every test with the real servers started for the run
	$(BIN)/python dev/services run -- $(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory cluster-test

# Apart from the rest: the cluster's dozen pods would share the 2 cores with every other test.
cluster-test: $(STAMP) ## the Knative end-to-end tests, on a one-node cluster started for the run (root)
	$(BIN)/python dev/services run --also cluster -- $(BIN)/python -m pytest -m cluster $(PYTEST_ARGS)

cluster-up: $(STAMP) ## start the one-node Knative cluster beside the other servers, leave it running
	$(BIN)/python dev/services up
	$(BIN)/python dev/services up cluster

up: $(STAMP) ## start the real servers (Kafka, S3, Jaeger, Kubernetes API) on 127.0.0.1, leave them running
	$(BIN)/python dev/services up

down: ## stop the servers that `make up` started
	@test -x $(BIN)/python && $(BIN)/python dev/services down || true

status: ## show which servers are running
	$(BIN)/python dev/services status

clean: ## remove the virtual environment and caches in the checkout
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache src/*.egg-info

.PHONY: demo
demo: $(STAMP) ## the main job: the whole pipeline on one machine, no server needed
	$(BIN)/mayfly demo

.PHONY: demo-real
demo-real: $(STAMP) ## the demo on the real servers of `make up`: Kafka, S3 and Jaeger
	@env_lines="$$($(BIN)/python dev/services env)"; eval "$$env_lines"; \
	if [ -z "$$MAYFLY_TEST_KAFKA_BOOTSTRAP" ] || [ -z "$$MAYFLY_TEST_S3_ENDPOINT" ] || [ -z "$$MAYFLY_TEST_JAEGER_URL" ]; then \
		echo "the real servers are not all running: run 'make up' first"; exit 1; fi; \
	MAYFLY_S3_ENDPOINT=$$MAYFLY_TEST_S3_ENDPOINT MAYFLY_S3_ACCESS_KEY=$$MAYFLY_TEST_S3_ACCESS_KEY \
	MAYFLY_S3_SECRET_KEY=$$MAYFLY_TEST_S3_SECRET_KEY OTEL_EXPORTER_OTLP_ENDPOINT=$$MAYFLY_TEST_OTLP_ENDPOINT \
	$(BIN)/mayfly demo --home .mayfly/demo-real --event-log kafka://$$MAYFLY_TEST_KAFKA_BOOTSTRAP \
		--store s3://mayfly-demo --jaeger-url $$MAYFLY_TEST_JAEGER_URL

.PHONY: bench
bench: $(STAMP) ## benchmarks against Celery, wrk and a fresh interpreter (after `make up`); installs redis-server, wrk, Celery
	@command -v redis-server >/dev/null && command -v wrk >/dev/null || { \
		echo "installing the Debian packages redis-server and wrk (benchmark baselines)"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server wrk; }
	@$(BIN)/python -c "import celery" 2>/dev/null || { \
		echo "installing the bench extra (Celery with Redis, py-spy, pyinstrument)"; \
		$(BIN)/python -m pip install --quiet -e '.[dev,bench]'; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)

.PHONY: chaos
chaos: $(STAMP) ## kill -9 of every part of Mayfly under 10,000 requests, on SQLite and on Kafka with a broker kill; prints the figures
	MAYFLY_CHAOS_REQUESTS=$${MAYFLY_CHAOS_REQUESTS:-10000} $(BIN)/python dev/services run -- \
		$(BIN)/python -m pytest -s -q tests/runtime/test_chaos.py $(PYTEST_ARGS)
