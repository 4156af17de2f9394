# Two entry points on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint samples bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tuban run configs/sample.yaml

test: $(STAMP)
	$(BIN)/ruff check pipeline tests bench sample_tiles
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench sample_tiles

samples: $(STAMP)
	$(BIN)/python sample_tiles/make_samples.py

clean:
	rm -rf runs .pytest_cache
