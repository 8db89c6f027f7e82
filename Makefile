# Two set-up commands, both idempotent on a fresh machine:
#   make smoke   install, then run the whole pipeline on the smoke config (local Ray, local storage)
#   make test    install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export INTRAQ_DATA_DIR ?= $(abspath ../shared/data)
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install smoke test lint

$(BIN)/intraq-pipeline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/intraq-pipeline

smoke: install
	$(BIN)/intraq-pipeline run --config configs/smoke.yaml --overwrite

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
