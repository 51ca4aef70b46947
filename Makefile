# Two commands for a new user: `make serve` and `make test`. Everything else is a helper.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast lint typecheck fmt model clean browser readme bench-scale bytecode

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,clients,otlp]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/servelm models fetch-default

serve: model
	$(BIN)/servelm serve --host $(HOST) --port $(PORT)

# The Node client tests (the Segmind pages' axios snippets) need axios; without npm
# they are skipped, with a reason.
JS_DEPS := tests/js/node_modules/.package-lock.json
$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node client tests will be skipped"; fi

# The console's browser tests drive Debian's Chromium through Playwright; without it
# (and no way to install it) they are skipped, with a reason.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "installing chromium for the console's browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1 || echo "could not install chromium: the browser tests will be skipped"; \
	fi

# The suite in TEST_JOBS processes, a test file per process at a time (module fixtures
# start once), the longest files first (tests/conftest.py, LONGEST_FIRST); the time it
# took is printed at the end. The type check runs beside it (on a fresh clone it is
# ~40 s of one core, which the suite's first minute spares better than a wait), and
# fails `make test` as it would before it. The sources are compiled first (bytecode).
TEST_JOBS ?= 3
MYPY_LOG := $(VENV)/mypy.log
test: model $(JS_DEPS) browser lint bytecode
	@start=$$(date +%s); \
	$(BIN)/mypy > $(MYPY_LOG) 2>&1 & typecheck=$$!; \
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder \
	  --durations=30 $(PYTEST_ARGS); status=$$?; \
	wait $$typecheck || status=1; echo "mypy:"; cat $(MYPY_LOG); \
	echo "make test: the suite and the type check took $$(( $$(date +%s) - start )) s"; \
	exit $$status

# The package and the tests compiled ahead (test, test-fast): where
# PYTHONDONTWRITEBYTECODE is set (this machine's shells) no process writes its own
# .pyc, and each of the suite's servers and commands compiled servelm anew (~0.4 s of
# CPU more for each import of the app).
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q src tests > /dev/null

# The walk's rules against the scripted engine: no model, no PostgreSQL, seconds; in
# two processes (60 s in one, 38 s in two here).
test-fast: $(STAMP) bytecode
	$(BIN)/python -m pytest -m fast -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

# Issue 15's benchmarks, one after another (docs/benchmarks.md, "Scale path"); about
# 25 minutes on a 2-core machine. Each waits for the machine's benchmark lock.
LITELLM_VENV ?= /tmp/litellm-venv
BENCH_LOCK := flock /tmp/servelm-bench.lock
bench-scale: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	test -x $(LITELLM_VENV)/bin/litellm || ($(PYTHON) -m venv $(LITELLM_VENV) && \
	  $(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]==1.103.7')
	$(BENCH_LOCK) $(BIN)/python bench/cost_growth.py
	$(BENCH_LOCK) $(BIN)/python bench/scale_path.py litellm --rounds 5 --litellm $(LITELLM_VENV)
	$(BENCH_LOCK) $(BIN)/python bench/scale_path.py postgres --rounds 3
	$(BENCH_LOCK) $(BIN)/python bench/scale_path.py workers
	$(BENCH_LOCK) $(BIN)/python bench/engine_efficiency.py --prompt-count exact,auto \
	  --repeats 2 --requests-per-slot 2

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info tests/js/node_modules

# The README's generated tables (settings, request conformance).
readme: $(STAMP)
	$(BIN)/python -m servelm.cli.docs_tables README.md
