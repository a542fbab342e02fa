# make demo / make test: create .venv if missing, install, run. Idempotent: a stamp file per
# extra makes a second run skip pip unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. CPU wheel by default; GPU users pick e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
DEMO_ARGS ?=  # e.g. --no-serve: end without serving the viewer

# Debian's chromium for the viewer's browser tests (Playwright drives /usr/bin/chromium; it never
# downloads a browser of its own). Installed once; the stamp skips the check afterwards.
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/clt-ray demo $(DEMO_ARGS)

$(VENV)/.chromium: | $(PY)
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }
	touch $@

test: $(VENV)/.installed-test $(VENV)/.chromium
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check clt_ray actors tests bench examples

clean-venv:
	rm -rf $(VENV)
