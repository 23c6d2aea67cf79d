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
LEDGER_WRITERS ?= 1

# Project-local Airflow: its config and metadata DB stay inside the project.
export AIRFLOW_HOME := $(CURDIR)/var/airflow
export AIRFLOW_CONFIG := $(CURDIR)/airflow.cfg
export ENTITLE_HOME ?= $(CURDIR)/var

# ops/run_dag.py runs one DAG with dag.test; --log FILE takes Airflow's output, --progress shows the run's.
RUN_DAG = PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python ops/run_dag.py

.PHONY: venv demo demo-programs test lint bench bench-airflow clean help airflow airflow-db scaleout-smoke issuer-service

help:
	@echo "make demo   - run the pipeline on $(DEMO_USERS) synthetic users (DEMO_USERS=N to change)"
	@echo "make demo-programs - only the channel credit, merchant cash and pass DAGs on demo inputs"
	@echo "make test   - ruff, mypy and pytest"
	@echo "make bench  - benchmark on BENCH_USERS=$(BENCH_USERS) users, backend BENCH_BACKEND=$(BENCH_BACKEND)"
	@echo "make bench-airflow - the nightly run on BENCH_USERS users through Airflow's scheduler vs the CLI"
	@echo "make airflow - Airflow UI + scheduler on http://127.0.0.1:8080 with this project's DAGs"
	@echo "make scaleout-smoke - the DAG on $(SCALEOUT_USERS) users on 3 Celery workers (Redis), PostgreSQL, S3 (moto); one worker killed mid-grant"
	@echo "make issuer-service - the reference entitlement service on 127.0.0.1:$(ISSUER_PORT), store ISSUER_STORE (SQLite), tokens ISSUER_TOKENS"
	@echo "make clean  - remove var/ (ledger, snapshots, Airflow metadata)"

$(STAMP): requirements.lock pyproject.toml services/issuer/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e . -e services/issuer
	@touch $(STAMP)

venv: $(STAMP)

# The demo runs the DAG entitlement_grant end to end through Airflow (dag.test: no scheduler
# needed), printing its progress (task instances done) as it goes, then the ledger summary and the
# next steps. Airflow's own task logs go to var/airflow/demo-run.log. demo-users stops (exit 5) when
# the ledger holds a demo of other users, which this run would report as unexpected grants.
demo: airflow-db
	@mkdir -p $(ENTITLE_HOME)/incoming
	$(BIN)/entitle demo-users --count $(DEMO_USERS) --out $(ENTITLE_HOME)/incoming/users.parquet
	@echo "running DAG entitlement_grant through Airflow (task logs: $(AIRFLOW_HOME)/demo-run.log) ..."
	@$(RUN_DAG) --log $(AIRFLOW_HOME)/demo-run.log --progress entitlement_grant \
		'{"snapshot_uri": "$(ENTITLE_HOME)/incoming/users.parquet"}'; \
		status=$$?; tail -n 1 $(AIRFLOW_HOME)/demo-run.log; \
		grep -E "check: |planned [0-9,]+, written" $(AIRFLOW_HOME)/demo-run.log | sed -E 's/^.*(check: |planned )/\1/' | head -n 2; \
		if [ $$status -ne 0 ]; then grep -E "^[A-Za-z_.]+(Error|Exception): " $(AIRFLOW_HOME)/demo-run.log | tail -n 1; fi; \
		exit $$status
	$(BIN)/entitle summary
	$(BIN)/entitle status
	@$(MAKE) --no-print-directory demo-programs
	@$(BIN)/python ops/demo_next_steps.py

# The other programs of the plan, each through its own DAG: channel credit to every merchant of
# a list, merchant cash claims (ingest, tiers, review queue, payouts, reconciliation) and the
# first-come-first-served pass (with a demo stock cap of DEMO_PASS_CAP so that it sells out).
DEMO_MERCHANTS ?= 20000
DEMO_CLAIMS ?= 5000
DEMO_APPLICATIONS ?= 40000
DEMO_PASS_CAP ?= 10000
define demo_dag
	@echo "running DAG $(1) through Airflow (task logs: $(AIRFLOW_HOME)/demo-$(1).log) ..."
	@$(RUN_DAG) --log $(AIRFLOW_HOME)/demo-$(1).log --progress $(1) '{}' $(2); status=$$?; \
		tail -n 1 $(AIRFLOW_HOME)/demo-$(1).log; \
		if [ $$status -ne 0 ]; then grep -E "^[A-Za-z_.]+(Error|Exception): " $(AIRFLOW_HOME)/demo-$(1).log | tail -n 1; fi; \
		exit $$status
endef

demo-programs: export ENTITLE_PASS_PROGRAM = $(ENTITLE_HOME)/demo/drawer_pass_demo.toml
demo-programs: airflow-db
	$(BIN)/python ops/demo_programs.py $(ENTITLE_HOME) --merchants $(DEMO_MERCHANTS) --claims $(DEMO_CLAIMS) \
		--applications $(DEMO_APPLICATIONS) --pass-cap $(DEMO_PASS_CAP)
	$(call demo_dag,channel_credit)
	ENTITLE_CAMPAIGN=channel-credit-2022 $(BIN)/entitle summary
	$(call demo_dag,merchant_cash,2023-01-15T03:00:00+09:00)
	$(BIN)/entitle claims reconcile
	$(BIN)/entitle query open_reviews | head -n 8
	$(call demo_dag,drawer_pass)
	$(BIN)/entitle pass status

# Project-local Airflow metadata DB (SQLite under var/airflow) and the ledger writers pool.
# One slot: an SQLite ledger has one writer at a time (raise it for PostgreSQL).
airflow-db: venv
	@mkdir -p $(AIRFLOW_HOME)
	@$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/migrate.log; exit 1)
	@$(BIN)/airflow pools set ledger_writers $(LEDGER_WRITERS) "Concurrent ledger writers" > /dev/null

# Airflow UI and scheduler on http://127.0.0.1:8080 (user admin; the password is in
# var/airflow/simple_auth_manager_passwords.json.generated). Ctrl-C stops it.
airflow: airflow-db
	@test -s $(AIRFLOW_HOME)/secrets.env || $(BIN)/python -c "import secrets; \
		print('export AIRFLOW__API_AUTH__JWT_SECRET=' + secrets.token_urlsafe(64)); \
		print('export AIRFLOW__API__SECRET_KEY=' + secrets.token_urlsafe(32))" > $(AIRFLOW_HOME)/secrets.env
	. $(AIRFLOW_HOME)/secrets.env && PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/airflow standalone

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# The report tests open the HTML in Debian's headless Chromium: installed here when missing (as root);
# without it those tests skip with the reason (CI sets ENTITLE_REQUIRE_BROWSER=1: they fail instead).
test: lint
	@bash ops/ensure_chromium.sh > /dev/null 2>&1 || echo "chromium unavailable: the browser tests will skip (see ops/ensure_chromium.sh)"
	$(BIN)/pytest

# Scale-out smoke test (docs/how-to/scale-out.md): api-server, scheduler, dag-processor and three
# Celery workers with their own empty homes as separate processes, PostgreSQL metadata and ledger,
# Redis broker, partitions on moto's S3 server; one worker is killed mid-grant; 2 to 2.5 min.
SCALEOUT_USERS ?= 1000000
scaleout-smoke: venv
	$(BIN)/python ops/scaleout_smoke.py --users $(SCALEOUT_USERS)

# The reference entitlement service (README "The reference entitlement service"); Ctrl-C stops it.
# ISSUER_ARGS adds options, e.g. ISSUER_ARGS="--fault-error-rate 0.05 --fault-seed 1".
ISSUER_PORT ?= 8700
ISSUER_STORE ?= $(ENTITLE_HOME)/issuer/issuer.sqlite
ISSUER_ARGS ?=
# Every client needs a token: the first start writes ISSUER_TOKENS with one token holding every right
# (readable by its owner only); give it to the pipeline as ENTITLE_ISSUER_<NAME>_TOKEN.
ISSUER_TOKENS ?= $(ENTITLE_HOME)/issuer/tokens
issuer-service: venv
	@test -s $(ISSUER_TOKENS) || { mkdir -p $(dir $(ISSUER_TOKENS)) && install -m 600 /dev/null $(ISSUER_TOKENS) && \
		$(BIN)/python -c "import secrets; print(secrets.token_urlsafe(32), '*', '  # written by make issuer-service')" \
		> $(ISSUER_TOKENS) && echo "wrote a token with every right to $(ISSUER_TOKENS): export ENTITLE_ISSUER_SHOP_TOKEN=\$$(cut -d' ' -f1 $(ISSUER_TOKENS))"; }
	$(BIN)/python -m issuer_service --store $(ISSUER_STORE) --host 127.0.0.1 --port $(ISSUER_PORT) \
		--tokens-file $(ISSUER_TOKENS) $(ISSUER_ARGS)

bench: venv
	$(BIN)/python bench/bench.py --users $(BENCH_USERS) --backend $(BENCH_BACKEND)

# The nightly run through Airflow's real scheduler (LocalExecutor, REST API) against the same stages
# through the CLI, then a night with nothing new (README "Performance").
bench-airflow: venv
	$(BIN)/python bench/bench_airflow.py --users $(BENCH_USERS)

clean:
	rm -rf var
