# The README's two commands: `make run` (the full pipeline on the bundled sample, offline)
# and `make test` (the whole suite). Both create .venv from the lock file when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Telemetry off everywhere; stage commands must find this venv's python first on PATH.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export BENTOML_DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(BIN):$(PATH)

.PHONY: run test test-fast lint install lock bench clean

install: $(STAMP)

# --compile-bytecode: write every .pyc once at install. Where PYTHONDONTWRITEBYTECODE is set
# (many CI images), Python otherwise recompiles TensorFlow, MLflow, Prefect... from source in
# every process: ~15 s more per import of the stack on 2 cores, in every stage and server.

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	@touch $@

run: $(STAMP)
	$(BIN)/mnist-mlops run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit-run loop: the unit tests only (no training, no servers), in about a minute.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/serving.py

# Re-pin every dependency (run after editing pyproject.toml's dependencies).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements.lock

clean:
	rm -rf $(VENV) artifacts reports mlflow.db mlruns
