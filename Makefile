# The two commands a newcomer needs (see README.md):
#   make run    set up, then run the default suite on this host
#   make test   set up, then run the test suite
# Extra arguments: make run ARGS="-k thp/2m"   make test ARGS="-k dirty"
.PHONY: run test lint setup bench soak fuzz clean

setup:
	@scripts/bootstrap.sh run

run: setup
	.venv/bin/kvmsplit run $(ARGS)

test: lint
	.venv/bin/python -m pytest $(ARGS)

lint:
	@scripts/bootstrap.sh test
	.venv/bin/ruff check .
	.venv/bin/mypy

soak: setup
	KVMSPLIT_SOAK_N=500 .venv/bin/python -m pytest -s -p no:cacheprovider tests/test_soak.py $(ARGS)

fuzz:
	@scripts/bootstrap.sh test
	KVMSPLIT_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -p no:cacheprovider --timeout=0 tests/test_fuzz.py $(ARGS)

# The whole bench set (bench/run_all.py; about 15 minutes here): bench/RESULTS.md and
# bench/results.json; exits 1 on a missed goal. Builds come from the tests' cache
# (KVMSPLIT_CACHE_DIR, default ~/.cache/kvmsplit-test); ARGS="--quick" checks the bench itself.
bench: setup
	@scripts/bootstrap.sh test
	.venv/bin/ruff check bench
	.venv/bin/mypy bench
	KVMSPLIT_CACHE_DIR=$${KVMSPLIT_CACHE_DIR:-$$HOME/.cache/kvmsplit-test} .venv/bin/python bench/run_all.py $(ARGS)

clean:
	rm -rf .venv results .pytest_cache
