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
	$(BIN)/python -m cli.devstack

test: install
	$(BIN)/python -m pytest -q

# The proofs of README.md's Guarantees, at length: 1000 fuzzed examples per operation
# and mode and of signed webhook events, 60 rounds of racing refunds (make test: 25, 10).
test-long: install
	FUZZ_EXAMPLES=1000 OVER_REFUND_ROUNDS=60 $(BIN)/python -m pytest -q -s tests/fuzz tests/payments/test_webhook_fuzz.py tests/chaos/test_over_refund.py

# Four minutes of refunds while workers are SIGKILLed, Redis and Postgres restart and
# Stripe fails; exits 1 on any violation (tests/chaos/runner.py). Vary it with
# CHAOS_ARGS="--duration 600 --rate 10 --seed 7 --logs ./chaos-logs".
chaos: install
	$(BIN)/python -m tests.chaos.runner $(CHAOS_ARGS)

# Figures against a raw baseline measured in the same run (bench/README.md); a few
# minutes. Knobs: BENCH_PAYMENTS, BENCH_SECONDS, BENCH_CONNECTIONS, ... (bench/run.py).
bench: install
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
