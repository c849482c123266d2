# Everyday verbs. `make` lists them. Every target first makes sure .venv matches uv.lock.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
UV_VERSION := 0.13.9
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export UV_PYTHON_DOWNLOADS := never

.PHONY: help setup data-package browser repro test test-fast ui compare reproduce params lint

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.synced ## install the pinned environment into .venv (again only when pyproject.toml or uv.lock change)

$(VENV)/.synced: pyproject.toml uv.lock
	@test -x $(VENV)/bin/uv || { python3 -m venv $(VENV) && $(VENV)/bin/pip install -q "uv==$(UV_VERSION)"; }
	uv sync --locked --compile-bytecode  # imports then read .pyc files, also where PYTHONDONTWRITEBYTECODE is set
	@touch $@

data-package: ## install Fashion-MNIST from the Debian package dataset-fashion-mnist, where apt and root are at hand
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: dataset-fashion-mnist not installed (needs apt and root); the download stage tries the official URLs"; fi

browser: ## install Chromium and ChromeDriver (Debian packages) for the UI's browser test, where apt and root are at hand
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: chromium and chromium-driver not installed (needs apt and root); the browser test will fail"; fi

repro: setup data-package ## set up, then run the whole pipeline (dvc repro, default profile)
	dvc repro

# pytest-xdist: a worker per core (at most 4); the suite waits on process start-ups, stores and servers as much as
# it computes, so two workers on two cores nearly halve it
PYTEST := pytest -n auto --maxprocesses 4

test: setup browser ## set up, then run every test, the slow end-to-end ones included
	$(PYTEST)

test-fast: setup ## the tests without the slow end-to-end runs
	$(PYTEST) -m "not slow"

ui: setup ## the MLflow UI on the project's store: http://127.0.0.1:5000 (loopback; conf/tracking)
	python -m pipeline.ui

compare: setup ## two runs side by side: make compare A=cnn B=cnn_aug (run ids or stage names)
	python -m pipeline.compare $(A) $(B)

reproduce: setup ## run a logged stage run again from its commit and params, and compare: make reproduce RUN=<run id> [TOL=0.01]
	python -m pipeline.reproduce $(RUN) $(if $(TOL),--tolerance $(TOL))

params: setup ## regenerate params.yaml from conf/ (commit both)
	python -m pipeline.config

lint: setup ## ruff
	ruff check pipeline tests bench
