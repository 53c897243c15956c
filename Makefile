# Everything installs into .venv on first use; python3 (3.11+) is the only prerequisite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-long bench chaos lint migrate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

migrate: install
	$(BIN)/alembic upgrade head

run: install
	$(BIN)/python -m shared.devstack

test: install
	$(BIN)/python -m pytest -q

# Figures against a raw baseline measured in the same run (bench/README.md); a few
# minutes. Knobs: BENCH_PAYMENTS, BENCH_SECONDS, BENCH_CONNECTIONS, ... (bench/run.py).
bench: install
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
