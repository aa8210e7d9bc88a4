# pneumo: two commands on a fresh machine.
#   make demo   set up .venv, then synth -> train -> batch score -> serve, on an embedded local Ray
#   make test   set up .venv, then the whole test suite
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

bench: setup
	@echo "see BENCHMARKS.md for each benchmark's command"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
