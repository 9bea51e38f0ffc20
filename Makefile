# The two commands: `make up` runs Lakelet; `make test` runs the whole test suite.
# Both install what is missing first (scripts/setup.sh).
.PHONY: up test lint bench setup

up:
	@scripts/setup.sh
	.venv/bin/lakelet up $(ARGS)

test:
	@scripts/setup.sh --test
	.venv/bin/ruff check .
	.venv/bin/pytest -q $(ARGS)

lint:
	@scripts/setup.sh --test
	.venv/bin/ruff check .

bench:
	@scripts/setup.sh --test --bench
	.venv/bin/python bench/proxy.py --quick
	.venv/bin/python bench/wake.py --quick
	.venv/bin/python bench/branching.py --quick
	.venv/bin/python bench/data_api.py --quick
