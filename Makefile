# pneumo: two commands on a fresh machine.
#   make demo   set up .venv, then synth -> train -> batch score -> serve, on an embedded local Ray
#   make test   set up .venv, then the whole test suite
#   make bench  the benchmarks, quick (FULL=1: the sizes BENCHMARKS.md reports)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test setup browser lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	@touch $(STAMP)

# Debian's chromium for the headless browser test (root only; skipped elsewhere).
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed; the browser test will skip"; \
	  else echo "chromium not found; the browser test will skip"; fi; \
	fi

demo: setup
	$(VENV)/bin/pneumo demo --out $(DEMO_OUT)

test: setup browser
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# Benchmarks (pneumo and its plain baseline side by side; ratios printed). Quick by default;
# `make bench FULL=1` runs the sizes BENCHMARKS.md reports. Needs ../shared/data.
BENCH_PY := $(VENV)/bin/python benchmarks
bench: setup
	@test -d ../shared/data || { echo "make bench needs ../shared/data (see BENCHMARKS.md)"; exit 2; }
ifdef FULL
	$(BENCH_PY)/bench_score.py --sizes 600,2400 --json bench_score.json
	$(BENCH_PY)/bench_feature_cache.py --n 1024
	$(BENCH_PY)/bench_serve.py
	$(BENCH_PY)/bench_train_throughput.py --images 4096 --epochs 3
	nice -n 10 $(BENCH_PY)/bench_incremental.py --sizes 100000,1000000 --json bench_incremental.json
else
	$(BENCH_PY)/bench_score.py --sizes 100,200 --fit-n 100 --val-n 100 --plain-n 64 --forward-n 32
	$(BENCH_PY)/bench_feature_cache.py --n 256 --repeats 1
	$(BENCH_PY)/bench_serve.py --requests 60 --skip-autoscale
	$(BENCH_PY)/bench_train_throughput.py --images 256 --epochs 2
	$(BENCH_PY)/bench_incremental.py --sizes 2000,10000
endif

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
