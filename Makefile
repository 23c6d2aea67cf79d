# Two commands do all set-up on a fresh machine with only Python 3.11+:
#   make demo   bootstrap .venv, run the whole pipeline on DEMO_USERS synthetic users
#   make test   ruff, mypy (strict on pipeline/), then pytest
# Everything is installed from requirements.lock into .venv; nothing goes outside the project.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_USERS ?= 1000000
BENCH_USERS ?= 48000000
BENCH_BACKEND ?= sqlite

# Project-local Airflow: its config and metadata DB stay inside the project.
export AIRFLOW_HOME := $(CURDIR)/var/airflow
export AIRFLOW_CONFIG := $(CURDIR)/airflow.cfg
export ENTITLE_HOME ?= $(CURDIR)/var

.PHONY: venv demo test lint bench clean help

help:
	@echo "make demo   - run the pipeline on $(DEMO_USERS) synthetic users (DEMO_USERS=N to change)"
	@echo "make test   - ruff, mypy and pytest"
	@echo "make bench  - benchmark on BENCH_USERS=$(BENCH_USERS) users, backend BENCH_BACKEND=$(BENCH_BACKEND)"
	@echo "make clean  - remove var/ (ledger, snapshots, Airflow metadata)"

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	@mkdir -p $(ENTITLE_HOME)
	$(BIN)/entitle demo-users --count $(DEMO_USERS) --out $(ENTITLE_HOME)/demo/users.parquet
	$(BIN)/entitle run --users $(ENTITLE_HOME)/demo/users.parquet
	$(BIN)/entitle summary

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: venv
	$(BIN)/python bench/bench.py --users $(BENCH_USERS) --backend $(BENCH_BACKEND)

clean:
	rm -rf var
