# Every target sets up what it needs: a fresh clone needs only Python 3.11+ (and a C compiler
# for the optional Cython codec; without one the pure-Python codec runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# What running needs: the package and its runtime dependencies (the codec is compiled in pip's
# build environment), no test toolchain. The full install ($(STAMP)) is a superset.
RUN_STAMP := $(VENV)/.run-stamp
PYTEST_ARGS ?=

.PHONY: install ext run demo sim test lint format bench soak clean env-example

# In CI the Cython codec must be built and tested, not skipped.
ifdef CI
export FASTPROXY_REQUIRE_EXT := 1
endif

$(STAMP): pyproject.toml setup.py $(wildcard ext/*.pyx)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fastproxy needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python setup.py -q build_ext --inplace
	@touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml setup.py $(wildcard ext/*.pyx)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fastproxy needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	@touch $(RUN_STAMP)

install: $(STAMP)

ext: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

# Settings: the environment, and .env when there is one (cp .env.example .env).
LOAD_ENV := set -a; if [ -f .env ]; then . ./.env; fi; set +a;

run: $(RUN_STAMP)
	@$(LOAD_ENV) exec $(BIN)/fastproxy

demo: $(RUN_STAMP)
	@$(LOAD_ENV) exec $(BIN)/fastproxy --demo --log-format text

env-example:
	$(PYTHON) -m fastproxy.config > .env.example

sim: $(RUN_STAMP)
	$(BIN)/fastproxy sim --port 9001

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The whole suite on the Cython codec, then the codec and hub again on the pure-Python one.
test: lint
	FASTPROXY_PURE=1 $(BIN)/python -m pytest -q tests/test_codec.py tests/test_codec_diff.py tests/test_hub.py
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

soak: $(STAMP)
	$(BIN)/python -m pytest --run-slow -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fastproxy/*.so fastproxy/codec/*.so ext/*.c
