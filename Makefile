# One command each: `make serve` sets up and runs the service on the embedded
# database; `make test` sets up and runs the tests. Both need only Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# The virtualenv's tools (buf, protoc plugins) come first on PATH.
export PATH := $(BIN):$(PATH)
# What is installed in the virtualenv: serving needs the service and its embedder
# (the wordllama extra); the tests, checks and codegen need the dev extra too.
SERVE_INSTALLED := $(VENV)/.installed-serve
DEV_INSTALLED := $(VENV)/.installed-dev

.PHONY: setup serve test bench protos lint check schema

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(SERVE_INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[wordllama]'
	touch $@

# The dev extra includes the serving one, so it counts as both.
$(DEV_INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(SERVE_INSTALLED)

setup: $(DEV_INSTALLED)

serve: $(SERVE_INSTALLED)
	$(BIN)/nexus serve

test: setup
	$(BIN)/pytest

bench: setup
	bash bench/run.sh

protos: setup
	$(BIN)/python scripts/gen_protos.py

lint: setup
	$(BIN)/buf lint

# ruff over the tree, mypy over the service, devtools/ and bench/;
# tests/operations/test_source.py runs the same checks in the suite.
check: setup
	$(BIN)/ruff check .
	$(BIN)/mypy service/nexus devtools bench

# db/schema.sql, the schema after all migrations: regenerate after adding one.
schema: setup
	$(BIN)/python scripts/dump_schema.py
