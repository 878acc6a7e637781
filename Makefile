# Two commands do all the set-up on a fresh machine: `make up` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: up test lint install

# A stamp so the install runs again only when the dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the range in pyproject.toml would otherwise pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Start API, worker and dispatcher on the embedded defaults (SQLite, filesystem broker,
# outputs under ./darkroom-data) with the tiny CPU models unless DARKROOM_MODEL_PRESET is set.
up: install
	DARKROOM_MODEL_PRESET=$${DARKROOM_MODEL_PRESET-tiny} $(BIN)/darkroom up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The whole suite: lint, types, then every test against real Postgres and Redis on 127.0.0.1.
test: lint
	./scripts/dev-services.sh
	./scripts/system-deps.sh
	$(BIN)/python -m pytest
