# Everyday verbs. `make` lists them. Every target first makes sure .venv matches uv.lock.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
UV_VERSION := 0.13.9
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export UV_PYTHON_DOWNLOADS := never

.PHONY: help setup data-package browser postgres repro test test-fast ui server search migrate compare reproduce params lint

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.synced ## install the pinned environment into .venv (again only when pyproject.toml or uv.lock change)

$(VENV)/.synced: pyproject.toml uv.lock
	@test -x $(VENV)/bin/uv || { python3 -m venv $(VENV) && $(VENV)/bin/pip install -q "uv==$(UV_VERSION)"; }
	uv sync --locked --compile-bytecode  # imports then read .pyc files, also where PYTHONDONTWRITEBYTECODE is set
	@touch $@

# $(call apt_install,DEBIAN PACKAGES,TEST THAT THEY ARE THERE,WHAT HAPPENS WITHOUT THEM): where apt and root are at hand
define apt_install
	@if $(2); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); \
	else echo "note: $(1) not installed (needs apt and root); $(3)"; fi
endef

data-package: ## install Fashion-MNIST from the Debian package dataset-fashion-mnist, where apt and root are at hand
	$(call apt_install,dataset-fashion-mnist,dpkg -s dataset-fashion-mnist >/dev/null 2>&1,the download stage tries the official URLs)

browser: ## install Chromium and ChromeDriver (Debian packages) for the UI's browser test, where apt and root are at hand
	$(call apt_install,chromium chromium-driver,command -v chromium >/dev/null && command -v chromedriver >/dev/null,the browser test will fail)

postgres: ## install PostgreSQL (Debian's postgresql) for make server, where apt and root are at hand
	$(call apt_install,postgresql,ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null,make server and its test will fail)

repro: setup data-package ## set up, then run the whole pipeline (dvc repro, default profile)
	dvc repro

# pytest-xdist: a worker per core (at most 4); the suite waits on process start-ups, stores and servers as much as
# it computes, so two workers on two cores nearly halve it (a third made it slower: 18:51 against 17:23). loadgroup:
# the two smoke pipelines run first, one after the other on one worker (tests/conftest.py); the slowest are listed
PYTEST := pytest -n auto --maxprocesses 4 --dist loadgroup --durations=15

test: setup browser postgres ## set up, then run every test, the slow end-to-end ones included
	$(PYTEST)

test-fast: setup ## the tests without the slow ones (marker slow: end-to-end pipelines, multi-fit trainings)
	$(PYTEST) -m "not slow"

ui: setup ## the MLflow UI on the project's store: http://127.0.0.1:5000 (loopback; conf/tracking)
	python -m pipeline.ui

server: setup postgres ## a team's MLflow tracking server on PostgreSQL: http://127.0.0.1:5000; stages use it with -S tracking=server
	python -m pipeline.server $(ARGS)

search: setup ## the searching stages with WORKERS processes running the trials (keras-tuner chief/workers on loopback): make search WORKERS=2 [STAGE=cnn]
	dvc exp run -S tuner.workers=$(or $(WORKERS),2) $(STAGE)

migrate: setup ## copy the local store's runs into the server: make migrate [TO=<uri>] [FROM=<uri>] [EXPERIMENTS=...]
	python -m pipeline.migrate $(if $(FROM),--from $(FROM)) $(if $(TO),--to $(TO)) $(EXPERIMENTS)

compare: setup ## two runs side by side: make compare A=cnn B=cnn_aug (run ids or stage names)
	@test -n "$(A)" -a -n "$(B)" || { echo "make compare: set A and B, run ids or stage names: make compare A=cnn B=cnn_aug" >&2; exit 2; }
	python -m pipeline.compare $(A) $(B)

reproduce: setup ## run a logged stage run again from its commit and params, and compare: make reproduce RUN=<run id> [TOL=0.01]
	python -m pipeline.reproduce $(RUN) $(if $(TOL),--tolerance $(TOL))

params: setup ## regenerate params.yaml from conf/ (commit both)
	python -m pipeline.config

lint: setup ## ruff
	ruff check pipeline tests bench
