# The two commands a new user needs: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build first: a bare `torch` requirement would pull GBs of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint unit integration mutate schemas clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,train,prices,parquet]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/frugalstream demo --json out/demo.json

lint: setup
	$(VENV)/bin/ruff check services tests scripts deploy
	$(VENV)/bin/mypy

# The mutation check, then the whole suite (pytest's summary stays the last line of the run).
test: lint
	$(MAKE) mutate
	$(PY) -m pytest

# Breaks each promise in tests/mutations.toml in a scratch copy; fails if a mutation survives its guard tests.
MUTATE_ARGS ?=
mutate: setup
	$(PY) scripts/mutate.py --jobs 2 $(MUTATE_ARGS)

unit: setup
	$(PY) -m pytest tests/unit

integration: setup
	$(PY) -m pytest tests/integration

schemas: setup
	$(PY) -m frugalstream.schemas.generate

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
