# moeflow: the two README commands live here.
#   make pipeline   set up, start the local services, run the tiny pipeline
#   make test       set up, run the test suite
# Everything installs from constraints.txt (the tested, pinned dependency set).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= tiny
# the default run leaves out tests marked slow (learning curves, multi-process faults, Ray Serve load);
# `make test-all` runs everything
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup test test-all pipeline up down clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: setup
	CI=$${CI:-} $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	CI=$${CI:-} $(BIN)/python -m pytest

up: setup
	$(BIN)/moeflow up

down:
	$(BIN)/moeflow down

pipeline: setup
	$(BIN)/moeflow up
	$(BIN)/moeflow run pipeline --recipe $(RECIPE)

clean-venv:
	rm -rf $(VENV)
