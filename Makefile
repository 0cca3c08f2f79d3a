# Set-up on a fresh machine, in a virtual environment (.venv) that leaves the system Python alone:
# the CPU build of torch first (a plain `torch` would pull GB of CUDA wheels), then the package and
# its test dependencies. Every target runs the venv's python; `make setup` only installs, and does
# nothing again until pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/scoreprior demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(PY) benchmarks/bench_logprob.py
