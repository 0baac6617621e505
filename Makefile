# The venv is built from requirements.lock (every package version, with sha256 hashes), then the
# project itself goes in editable without dependencies. It is rebuilt only when pyproject.toml or
# requirements.lock changes (the stamp file is newer otherwise).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
LOCK := requirements.lock

# `make lock` regenerates $(LOCK) from pyproject.toml: the dependencies plus the `test` extra (ruff
# included), every transitive package pinned, with sha256 hashes. Tool: `uv pip compile` (uv pinned
# below, installed into its own venv $(LOCK_TOOLS) so that the project venv holds exactly the locked
# packages). The command it runs is the lock's header. uv does not read pip's config, so it is given the
# sources pip installs from here (`pip config get global.extra-index-url` and `global.find-links`: the
# local file:// indexes with torch/torchvision on this machine's disk, and /opt/wheels). Flags:
#   --extra=test                        pytest, pytest-timeout, ruff
#   --generate-hashes                   sha256 as the indexes list them; `make` installs in hash-checking mode
#   --python python3                    resolve for the interpreter the venv is made from ($(PYTHON))
#   --index-strategy unsafe-best-match  like pip: the newest allowed version across all indexes (uv's
#                                       default stops at the first index that has the package)
# Not pip-compile: pip-tools 7.6.2 with --generate-hashes downloads every file of every pinned version to
# hash it (all platforms: gigabytes of torch/CUDA wheels), as this registry's JSON API lists other URLs.
# `make lock` keeps the current pins that still fit; `make lock LOCK_ARGS=--upgrade` moves every package
# to the newest allowed version, LOCK_ARGS='--upgrade-package NAME' only that one. Commit the new $(LOCK)
# with the pyproject.toml change; the next make reinstalls the venv from it.
UV_VERSION := 0.13.9
LOCK_TOOLS := $(VENV)/lock-tools
LOCK_ARGS ?=
pip_config = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
LOCK_SOURCES = $(foreach u,$(call pip_config,extra-index-url),--extra-index-url $(u)) \
	$(foreach d,$(call pip_config,find-links),--find-links $(d))
LOCK_CMD = uv pip compile pyproject.toml --extra=test --generate-hashes --python $(PYTHON) \
	--index-strategy unsafe-best-match $(strip $(LOCK_SOURCES)) --output-file=$(LOCK) $(LOCK_ARGS)

.PHONY: run test test-fast lint format lock bench clean

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

# The suite runs in TEST_WORKERS processes (pytest-xdist), one test file (or one test class) per
# worker at a time (--dist loadscope: a module's fixtures, such as its Prefect server, are built
# once; the classes of tests/flows/test_stop_phases.py spread over the workers). Much of the
# suite waits on servers, subprocesses and leases rather than computing, hence more workers than
# cores. `make test` lists its 15 slowest tests. timings: docs/development.md
TEST_WORKERS ?= 3
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15

# The inner loop: every test but those that start a Prefect server (the session's test API
# included) or are marked slow (markers: pyproject.toml); no lint (`make lint`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not server and not slow"

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

lock:
	test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) \
		&& $(LOCK_TOOLS)/bin/python -m pip install --quiet 'uv==$(UV_VERSION)'; }
	$(LOCK_TOOLS)/bin/$(LOCK_CMD) --quiet --custom-compile-command "$(strip $(LOCK_CMD))"

bench: $(STAMP)
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/recipe.py
	$(BIN)/python bench/flow.py
	$(BIN)/python bench/near_duplicates.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/distributed.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/photos.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/label_issues.py
	$(BIN)/python bench/score.py

clean:
	rm -rf $(VENV) artifacts/runs data/cache
