PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tested versions with hashes, generated from pyproject.toml by `make lock` (uv pip compile). LOCK is what the
# container image installs (runtime only); TEST_LOCK adds the `test` extra, pinned to the same runtime versions.
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock
UV_VERSION := 0.13.9
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" --quiet

.PHONY: run test bench lint install clean lock

# Reinstalls whenever a lock or pyproject.toml changes: first the locked versions, then the package without deps.
$(STAMP): $(TEST_LOCK) $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r $(TEST_LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Regenerate both locks from pyproject.toml. Versions already locked are kept unless the ranges exclude them;
# `make lock UPGRADE=--upgrade` takes the newest allowed, `make lock UPGRADE="--upgrade-package rq"` just one.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(UV_COMPILE) $(UPGRADE) -o $(LOCK)
	$(UV_COMPILE) $(UPGRADE) --extra test -c $(LOCK) -o $(TEST_LOCK)

run: $(STAMP)
	$(BIN)/persona-sync dev

test: $(STAMP)
	$(BIN)/ruff check service workers tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check service workers tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
