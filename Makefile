# Every target sets up what it needs: a fresh clone needs only Python 3.11+ (and a C compiler
# for the optional Cython codec; without one the pure-Python codec runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install ext run demo sim test lint format bench soak clean

$(STAMP): pyproject.toml setup.py $(wildcard ext/*.pyx)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fastproxy needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python setup.py -q build_ext --inplace
	@touch $(STAMP)

install: $(STAMP)

ext: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

run: $(STAMP)
	$(BIN)/fastproxy

demo: $(STAMP)
	$(BIN)/fastproxy --demo --log-format text

sim: $(STAMP)
	$(BIN)/fastproxy sim --port 9001

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

soak: $(STAMP)
	$(BIN)/python -m pytest --run-slow -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fastproxy/*.so ext/*.c
