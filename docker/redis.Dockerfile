# syntax=docker/dockerfile:1.7
# Redis for docker-compose.yml where the official image (redis:7.4.2-alpine3.21) cannot be pulled:
# Debian bookworm's redis-server (7.0) on the local base image (`make images`: REDIS_IMAGE names it
# for compose). Its build reads Debian's archive (`make images` builds it on the host's network, whose
# resolver the containers' own network may not reach); every other image builds with no network at all.
ARG BASE_IMAGE=localhost/mlplatform/python:3.11-bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
USER 999:999
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
HEALTHCHECK --interval=5s --timeout=2s --retries=10 CMD ["redis-cli", "ping"]
