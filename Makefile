# Two commands do all set-up on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0

$(BIN)/fedrec: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	# fedrec itself asks for a range; the pin is repeated so that pip keeps this build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]" "torch==2.13.0"
	touch $@

install: $(BIN)/fedrec

# Federated (a quarter of the users per round, two local epochs) vs central on the embedded
# synthetic data set (no download): prints a table, writes runs/demo/{comparison.md,...}.
# --keep-checkpoints keeps the devices' own state (runs/demo/federated.devices/, private: do
# not share it) and the server's checkpoints, for the demo page and for `fedrec forget`.
demo: install
	$(BIN)/fedrec compare --dataset synthetic --users-per-round 500 --local-epochs 2 --rounds 60 --epochs 60 \
		--eval-every 5 --keep-checkpoints --out runs/demo

# The demo page of one device's side of that run: open the URL it prints, http://127.0.0.1:8000/?token=...
# (the token is made afresh each start; without it the page answers 403). Ctrl-C stops it.
serve: install
	$(BIN)/fedrec serve --run runs/demo

# The tests that start no Flower engine, SuperLink or browser: every layer in process, in minutes.
test-fast: install
	$(BIN)/python -m pytest -m "not engine" -n 2

# The browser test needs Debian's chromium + chromedriver: installed with apt-get when missing.
test: install
	bash scripts/install-browser.sh
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# The same simulation through `flwr run .` on Flower's managed local SuperLink, offline.
flwr-run: install
	FLWR_HOME=$(CURDIR)/.flwr PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/flwr-run.sh

.PHONY: install demo serve test test-fast flwr-run
