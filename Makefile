# make demo / make test: create .venv if missing, install from the lock, run. Idempotent: a stamp
# file per extra makes a second run skip pip unless pyproject.toml or the lock changed.
PYTHON ?= python3
VENV ?= .venv
# The torch build, installed after the lock (which holds everything else, with hashes, and torch's
# pure-Python dependencies). CPU wheel by default; GPU users pick e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# `make lock` re-resolves requirements.lock (runtime) and requirements-test.lock (runtime + the test
# extra, the same pins) from pyproject.toml against PyPI, with hashes, for every platform.
UV_SPEC ?= uv==0.13.9
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
DEMO_ARGS ?=  # e.g. --no-serve: end without serving the viewer

# Debian's chromium for the viewer's browser tests (Playwright drives /usr/bin/chromium; it never
# downloads a browser of its own). Installed once; the stamp skips the check afterwards.
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test lint lock clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The lock with --require-hashes --no-deps (every package pinned and checked), then torch (its
# dependencies already satisfied from the lock), then the project itself without dependencies.
define install_locked
	$(PIP) install --quiet --require-hashes --no-deps -r $(1)
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet --no-deps -e .
endef

$(VENV)/.installed: pyproject.toml $(LOCK) | $(PY)
	$(call install_locked,$(LOCK))
	touch $@

$(VENV)/.installed-test: pyproject.toml $(TEST_LOCK) | $(PY)
	$(call install_locked,$(TEST_LOCK))
	touch $@ $(VENV)/.installed

LOCK_ARGS = --universal --generate-hashes --upgrade --no-emit-package torch \
	--default-index https://pypi.org/simple --custom-compile-command "make lock" --quiet
lock: | $(PY)
	$(PIP) install --quiet $(UV_SPEC)
	$(VENV)/bin/uv pip compile pyproject.toml --extra test $(LOCK_ARGS) -o $(TEST_LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml -c $(TEST_LOCK) $(LOCK_ARGS) -o $(LOCK)

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
