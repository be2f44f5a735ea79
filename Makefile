# The two commands a newcomer needs (see README.md):
#   make run    set up, then run the default suite on this host
#   make test   set up, then run the test suite
# Extra arguments: make run ARGS="-k thp/2m"   make test ARGS="-k dirty"
.PHONY: run test setup bench clean

setup:
	@scripts/bootstrap.sh run

run: setup
	.venv/bin/kvmsplit run $(ARGS)

test:
	@scripts/bootstrap.sh test
	.venv/bin/python -m pytest $(ARGS)

bench: setup
	.venv/bin/python bench/bench_bitmap_thp.py $(ARGS)

clean:
	rm -rf .venv results .pytest_cache
