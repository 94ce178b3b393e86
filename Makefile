# Two entry points: `make demo` (the main job on the shipped example) and `make test` (the suite).
# Both create .venv and install polyburn with its test extras first. `make docs` builds the
# documentation site (docs/, mkdocs.yml) into site/, strictly: a broken link fails it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench docs

$(BIN)/polyburn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/polyburn
	$(BIN)/polyburn run examples/export masks --mode semantic,instance,binary

test: $(BIN)/polyburn
	$(BIN)/python -m pytest

$(BIN)/mkdocs: $(BIN)/polyburn pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,docs]'
	touch $@

docs: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(BIN)/polyburn
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

bench: $(BIN)/polyburn
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/burn_kernel.py
