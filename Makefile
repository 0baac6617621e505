# The venv is built from requirements.lock (every package version, with sha256 hashes), then the
# project itself goes in editable without dependencies. It is rebuilt only when pyproject.toml or
# requirements.lock changes (the stamp file is newer otherwise).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
LOCK := requirements.lock

# `make lock` regenerates $(LOCK) from pyproject.toml (dependencies + the `test` extra, ruff included)
# with pip-compile from pip-tools, installed into its own venv ($(LOCK_TOOLS)) so that the project
# venv keeps exactly the locked packages. pip-compile resolves with pip's own finder and config
# (`pip config list`: find-links /opt/wheels and the local file:// indexes), like the install below,
# so torch/torchvision resolve to the wheels on this machine's disk. Flags:
#   --generate-hashes    sha256 of every allowed file; the install then runs in hash-checking mode
#   --allow-unsafe       pin setuptools too (torch and tensorboard need it at run time)
#   --strip-extras       plain `name==version` lines, usable as a constraints file
#   --extra=test         pytest, pytest-timeout, ruff
#   --no-emit-index-url --no-emit-find-links   no machine paths in the lock: pip's config supplies them
# It keeps the current pins that still fit; LOCK_ARGS=--upgrade moves every package to the newest
# allowed version, LOCK_ARGS='--upgrade-package NAME' only that one. With hashes it takes minutes
# (it reads every local wheel, torch and the CUDA libraries included). Commit the new $(LOCK) with
# the pyproject.toml change; the next make rebuilds the venv from it.
PIP_TOOLS := pip-tools==7.6.2
LOCK_TOOLS := $(VENV)/lock-tools
LOCK_ARGS ?=

.PHONY: run test lint format lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/visionflow train --dataset sample

# Lint failures fail `make test`; `make format` fixes what ruff can.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_TOOLS) \
		&& $(LOCK_TOOLS)/bin/python -m pip install --quiet --upgrade pip \
		&& $(LOCK_TOOLS)/bin/python -m pip install --quiet '$(PIP_TOOLS)'; }
	$(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra=test \
		--no-emit-index-url --no-emit-find-links $(LOCK_ARGS) --output-file=$(LOCK) pyproject.toml

bench: $(STAMP)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/flow.py

clean:
	rm -rf $(VENV) artifacts/runs data/cache
