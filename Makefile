# Everything a developer runs. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
export PORT
export FLOWER_BASIC_AUTH ?= admin:admin
PYTEST_ARGS ?= -n 2

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(BIN)/.installed ## Create the virtualenv and install the project

.PHONY: services
services: ## Start (or install) Redis and PostgreSQL if they are not running
	@bash scripts/services.sh

.PHONY: db
db: venv services ## Create the database if missing and apply migrations
	$(BIN)/flask --app wsgi db upgrade

.PHONY: run
run: db ## Run the platform on $(PORT) under supervisord, restarting what dies (Ctrl-C stops it)
	@# 10,000 sockets per gateway process need as many file descriptors.
	ulimit -n 65536 2>/dev/null || ulimit -n "$$(ulimit -Hn)"; \
	exec $(BIN)/python scripts/supervise.py

.PHONY: test
test: venv services ## Run the test suite against real Redis, PostgreSQL and processes
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: bench-ingest
bench-ingest: venv services ## Ingest benchmark on an API it starts (BASE_URL=... drives a running one)
	$(BIN)/python scripts/bench_ingest.py $(if $(BASE_URL),--base-url $(BASE_URL))

.PHONY: bench-delivery
bench-delivery: venv services ## Delivery benchmarks on a platform they start (SCENARIOS="latency fanout ...")
	$(BIN)/python scripts/bench_delivery.py $(SCENARIOS) --json var/bench-delivery.json

.PHONY: bench
bench: venv services ## Every benchmark on platforms it starts; writes the report to docs/BENCHMARKS.md
	$(BIN)/python scripts/bench.py

.PHONY: k6
k6: venv services ## The four k6 load tests (on a platform it starts; BASE_URL=... for a running one)
	$(BIN)/python scripts/k6/run.py $(K6_ARGS) $(if $(BASE_URL),--base-url $(BASE_URL))
