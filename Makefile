# synops-pipeline: every target bootstraps .venv from pyproject.toml when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= experiments/mnist.toml
TRACKING_URI ?= sqlite:///mlruns/mlflow.db
STORAGE ?= sqlite:///mlruns/optuna.db

.PHONY: install test test-quick lint data train sweep report snn deploy bench ui dashboard services services-stop clean

# Packages are byte-compiled on every core (pip compiles on one): where PYTHONDONTWRITEBYTECODE is
# set, no process would write what it compiles. Files that do not compile (templates) are skipped.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	$(BIN)/python -c "import pipeline, torch, torchvision, mlflow, optuna, sinabs, psycopg"
	touch $(STAMP)

install: $(STAMP)  ## create or refresh .venv

test: $(STAMP)  ## the test suite (generated data, plus one short run on real MNIST), one process per core
	$(BIN)/pytest -n auto --dist loadgroup

test-quick: $(STAMP)  ## the tests that train for at most a few seconds each
	$(BIN)/pytest -n auto --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests examples

data: $(STAMP)  ## fetch and verify the dataset of $(CONFIG)
	$(BIN)/synops data --config $(CONFIG)

train: $(STAMP)  ## one tracked training run of $(CONFIG)
	$(BIN)/synops train --config $(CONFIG)

sweep: $(STAMP)  ## the Optuna study of $(CONFIG): the accuracy-vs-SynOps front
	$(BIN)/synops sweep --config $(CONFIG)

report: $(STAMP)  ## Pareto-front report of the study of $(CONFIG) in reports/
	$(BIN)/synops report --config $(CONFIG)

snn: $(STAMP)  ## every front member of $(CONFIG)'s study simulated as a spiking network
	$(BIN)/synops snn --config $(CONFIG) --front

deploy: $(STAMP)  ## every front member of $(CONFIG)'s study checked for the Speck chip (8-bit, cores)
	$(BIN)/synops deploy --config $(CONFIG) --front

bench: $(STAMP)  ## training-step speed vs the tutorial's loop, and the counter's overhead
	$(BIN)/synops bench

ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1

dashboard: $(STAMP)  ## optuna-dashboard on http://127.0.0.1:8080 (installs the dashboard extra)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dashboard]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/optuna-dashboard $(STORAGE) --host 127.0.0.1 --port 8080

services: $(STAMP)  ## PostgreSQL + MLflow server on 127.0.0.1 for a study on several machines
	$(BIN)/synops services start --dir .services

services-stop: $(STAMP)  ## stop them (their data stays in .services/)
	$(BIN)/synops services stop --dir .services

clean:
	rm -rf reports .pytest_cache .ruff_cache
