# Everything runs from a local virtualenv; `make test` and `make demo` set it up on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/svdcompress
# Spinning OpenMP threads make torch several times slower on a busy shared CPU; passive waiting
# costs next to nothing on an idle one. Override with `make OMP_WAIT_POLICY=ACTIVE ...`.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-all lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(CLI) eval smollm2-135m --data wiki --seq-len 512 --samples 32

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check svdcompress tests experiments
