# Two entry points: `make demo` (the main job on the shipped example) and `make test` (the suite).
# Both create .venv and install polyburn with its test extras first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench

$(BIN)/polyburn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/polyburn
	$(BIN)/polyburn run examples/export masks --mode semantic,instance,binary

test: $(BIN)/polyburn
	$(BIN)/python -m pytest

lint: $(BIN)/polyburn
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

bench: $(BIN)/polyburn
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/burn_kernel.py
