#!/usr/bin/env bash
# A local base image made from Debian bookworm by debootstrap, for machines that cannot pull from a
# container registry (air-gapped CI, sandboxes): Debian's Python 3.11 in place of the official
# python:*-slim image. Skipped when the image already exists (podman's storage is the cache).
#   docker/base-image.sh localhost/mlplatform/python:3.11-bookworm python3 python3-venv python-is-python3 ca-certificates
# Needs root, debootstrap and podman (make system-deps); DEBIAN_MIRROR picks the archive.
set -euo pipefail
tag=$1; shift
packages=$(IFS=,; echo "$*")
if podman image exists "$tag"; then echo "$tag: exists"; exit 0; fi
root=$(mktemp -d "${TMPDIR:-/tmp}/rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include="$packages" bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Slim: no package caches, indexes, docs, man pages or translations (apt-get update restores the indexes).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
       "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
tar --numeric-owner -C "$root" -c . | podman import \
  --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV=LANG=C.UTF-8' \
  --change 'CMD=["/bin/bash"]' \
  --message "debootstrap --variant=minbase --include=$packages bookworm" - "$tag"
