# One command each: `make serve` sets up and runs the service on the embedded
# database; `make test` sets up and runs the tests. Both need only Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# The virtualenv's tools (buf, protoc plugins) come first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: setup serve test bench protos lint check schema

$(BIN)/nexus: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/nexus

serve: setup
	$(BIN)/nexus serve

test: setup
	$(BIN)/pytest

bench: setup
	bash bench/run.sh

protos: setup
	$(BIN)/python scripts/gen_protos.py

lint: setup
	$(BIN)/buf lint

# ruff over the tree, mypy over the service and devtools/ (and bench/ once it holds Python);
# tests/operations/test_source.py runs the same checks in the suite.
check: setup
	$(BIN)/ruff check .
	$(BIN)/mypy service/nexus devtools $(if $(wildcard bench/*.py bench/**/*.py),bench)

# db/schema.sql, the schema after all migrations: regenerate after adding one.
schema: setup
	$(BIN)/python scripts/dump_schema.py
