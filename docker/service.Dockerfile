# syntax=docker/dockerfile:1.7
# Image of one model service (fraud, cnn or sentiment): `docker buildx bake -f docker/docker-bake.json <service>` or
#   docker build -f docker/service.Dockerfile --build-arg SERVICE=cnn --build-arg VARIANT=gpu .
# VARIANT=cpu: Python slim base, onnxruntime, CPU torch. VARIANT=gpu: CUDA + cuDNN runtime base,
# onnxruntime-gpu, CUDA torch. Only runtime dependencies (never a service's `[build]` extra);
# no models inside: mount a model repository at /models (compose) or let Kubernetes copy it in.
# Each service's image (and GPU variant) is a target in docker/docker-bake.json; deploy/services.yaml lists them.
# Offline (air-gapped CI, `make images`): wheels from a wheelhouse, a base that needs no registry:
#   docker build -f docker/service.Dockerfile --build-arg SERVICE=fraud --build-arg PIP_OFFLINE=1 \
#     --build-context wheelhouse=build/wheelhouse --build-arg PYTHON_IMAGE=localhost/mlplatform/python:3.11-bookworm .

ARG VARIANT=cpu
# The CPU variant's base: the official slim image by default; `make base-image` makes one from Debian
# bookworm's Python 3.11 (debootstrap) where no registry can be reached.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Wheels for offline installs, mounted at /wheels in the build stage: empty unless replaced with
# `--build-context wheelhouse=<dir>` (`make wheelhouse`); with PIP_OFFLINE=1 pip reads only them.
FROM scratch AS wheelhouse

# --- Python runtime, per variant (pinned bases: exact patch and OS release tags) -------------
FROM ${PYTHON_IMAGE} AS python-cpu
# Where torch comes from (services that use it): the CPU build, never PyPI's CUDA-dependent default.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX=${TORCH_INDEX}

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS python-gpu
# Ubuntu 24.04's Python 3.12 (the project needs >= 3.11).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
# CUDA 13 torch, matching the base image and PyPI's onnxruntime-gpu (a CUDA 13 build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV TORCH_INDEX=${TORCH_INDEX}

# --- build: stubs generated, service installed into /opt/venv ------------------------------
FROM python-${VARIANT} AS build
ARG SERVICE
ARG VARIANT
ARG PIP_OFFLINE=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/wheels
WORKDIR /src
COPY constraints.txt docker/constraints-gpu.txt ./
COPY protos/ protos/
# protoc lives in a throw-away venv: generated stubs only go into the image.
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install ${PIP_OFFLINE:+--no-index} -c constraints.txt grpcio-tools googleapis-common-protos \
 && /opt/protoc/bin/python protos/generate.py
COPY libs/ libs/
COPY services/${SERVICE}/ services/${SERVICE}/
# libs[gpu] brings onnxruntime-gpu, which shares its import name with the CPU wheel a service
# may pull in: the CPU wheel is removed and the GPU one reinstalled over it.
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    test -n "${SERVICE}" || { echo "build arg SERVICE is required (fraud, cnn, sentiment)"; exit 1; } \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install ${PIP_OFFLINE:+--no-index} --extra-index-url "${TORCH_INDEX}" -c constraints.txt -c constraints-gpu.txt \
      ./protos "./libs[${VARIANT}]" "./services/${SERVICE}" \
 && if [ "${VARIANT}" = gpu ] && /opt/venv/bin/pip show -q onnxruntime 2>/dev/null; then \
      /opt/venv/bin/pip uninstall -y onnxruntime \
      && /opt/venv/bin/pip install ${PIP_OFFLINE:+--no-index} --force-reinstall --no-deps -c constraints-gpu.txt onnxruntime-gpu; fi \
 && /opt/venv/bin/pip check \
 && find /opt/venv/lib -depth -type d -path '*/site-packages/*/include' -exec rm -rf {} +  # C/C++ headers (torch: 62 MB)

# --- runtime ------------------------------------------------------------------------------
FROM python-${VARIANT} AS runtime
ARG SERVICE
ARG MODULE=${SERVICE}_service
LABEL org.opencontainers.image.title="mlplatform-${SERVICE}" \
      org.opencontainers.image.source="https://github.com/mlplatform/mlplatform"
RUN groupadd --system --gid 10001 mlplatform \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlplatform
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem friendly: no bytecode writes, caches and HOME under /tmp (a tmpfs).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SERVICE_MODULE=${MODULE}
USER 10001:10001
WORKDIR /tmp
# `python -m <module>`, as `make run` (scripts/run_local.py) starts it; compose and Kubernetes
# spell that command out. Settings come from the environment (<PREFIX>HOST=0.0.0.0 etc.).
CMD ["sh", "-c", "exec python -m \"$SERVICE_MODULE\""]
# grpc.health.v1 on the port the service's own settings resolve (NOT_SERVING until warmed up).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "python -m mlplatform.healthcheck --module \"$SERVICE_MODULE\""]
