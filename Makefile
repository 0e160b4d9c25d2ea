# make run   install into .venv, then run the main job on the embedded defaults
# make test  install (Debian's chromium too), then lint, check formatting and run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser run test lint format clean

install: $(STAMP)

# torch first and by exact version: this spec resolves to the CPU build, while an
# open range pulled in by another package could fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints.txt -e ".[test,stack]"
	touch $@

run: install
	$(BIN)/ldm retrain

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's chromium, for the test that loads the sampling page in a browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium; }

test: lint browser
	$(BIN)/pytest --durations=20

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
