# One-command setup, demo and tests. `make setup` is idempotent: it reinstalls only when
# pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: setup protos demo test clean

setup: $(STAMP) protos

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,serve,dev]'
	touch $(STAMP)

# gRPC stubs into the git-ignored serve/_gen (a no-op when up to date).
protos: $(STAMP)
	$(PY) -m protos.build

demo: setup
	$(PY) -m train.synthetic --out $(DEMO)/data --users 800 --items 400 --seed 7
	$(PY) -m train --config configs/demo.yaml --out $(DEMO)/run
	$(PY) -m export --run $(DEMO)/run --bundles $(DEMO)/bundles --factory HNSW32 --publish
	$(PY) -m serve.demo --bundles $(DEMO)/bundles --data $(DEMO)/data

test: setup protos
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
