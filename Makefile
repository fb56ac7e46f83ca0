# qwen3repro — entry points. Every target sets up what it needs (a .venv with torch 2.13.0 first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: help venv test test-all bench tiny-pipeline micro-pipeline clean

help:
	@echo "make tiny-pipeline   run the tiny replication end to end (writes runs/tiny/)"
	@echo "make test            CPU test suite (what CI runs)"
	@echo "make bench           benchmarks (pytest-benchmark), ratios against transformers"
	@echo "make clean           remove runs/ and caches (keeps .venv)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev,full]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(PY) -m pytest -q -m bench --benchmark-enable -s tests/bench

tiny-pipeline: $(STAMP)
	$(VENV)/bin/qwen3repro pipeline tiny

micro-pipeline: $(STAMP)
	$(VENV)/bin/qwen3repro pipeline micro

clean:
	rm -rf runs .pytest_cache .hypothesis
