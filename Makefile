# Two commands (see README): `make run` and `make test`. Everything lives in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# sysv_ipc from source: the PyPI wheel lacks semtimedop (lock timeouts). --force-reinstall
	# replaces a wheel that may already be installed.
	$(BIN)/pip install -q --force-reinstall --no-deps --no-binary sysv_ipc sysv_ipc
	$(BIN)/pip install -q --no-binary sysv_ipc -e '.[test,bench]'
	$(BIN)/python -c "import sysv_ipc, sys; sys.exit(0 if sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED else 'sysv_ipc lacks semtimedop')"
	touch $@

run: $(STAMP)
	$(BIN)/stated run

test: $(STAMP)
	bash .ci/system-deps
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/bench_dataplane.py

clean:
	rm -rf $(VENV) var
