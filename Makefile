# Set-up on a fresh machine: the CPU build of torch first (a plain `torch` would pull CUDA wheels),
# then the package with its extras.
PY ?= python3

.PHONY: setup demo test test-slow bench

setup:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

demo: setup
	scoreprior demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(PY) benchmarks/bench_logprob.py
