# Two commands (see README): `make run` and `make test`. Everything lives in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench clean native

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	# setuptools >= 77 in the venv too: `make native` rebuilds the extension with it (PEP 639 metadata)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

run: $(STAMP)
	$(BIN)/stated run

# the native core's extension, rebuilt in place when its C sources changed (a no-op otherwise)
native: $(STAMP)
	@$(BIN)/python setup.py -q build_ext --inplace > $(VENV)/native-build.log 2>&1 \
	  || { cat $(VENV)/native-build.log; echo "native: building stated.shm._native failed" >&2; exit 1; }

test: $(STAMP) native
	bash .ci/system-deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) native
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP) native
	$(BIN)/python bench/bench_dataplane.py

clean:
	rm -rf $(VENV) var
