"""Build the CPU images with podman, offline: `make images` (IMAGES="fraud gateway" for a subset).

Each image of docker/docker-bake.json's default group is built from its Dockerfile on a local base image
(`make base-image`: Debian bookworm's Python 3.11 from debootstrap) with Python packages from the host's
wheelhouse (`make wheelhouse`) and no network at all (`--network none`), tagged as the bake file tags it
(REGISTRY / TAG from the environment, else the bake file's defaults), so docker-compose.yml finds it.
`redis` is a stand-in for the official Redis image where no registry can be pulled from (Debian's
redis-server; its build needs Debian's archive). Prints each image's build time and size, and writes them
to build/images.json.

    python docker/images.py build [NAME ...]       # default: every CPU image + redis
    python docker/images.py names                  # image references, one per line (NAME=REF)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAKE = ROOT / "docker" / "docker-bake.json"
CONTAINERS_CONF = ROOT / "docker" / "podman" / "containers.conf"
BASE_IMAGE = "localhost/mlplatform/python:3.11-bookworm"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
REDIS_IMAGE = "localhost/mlplatform/redis:7.0-bookworm"
REPORT = ROOT / "build" / "images.json"


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the project's containers.conf unless one is set."""
    return {"CONTAINERS_CONF": str(CONTAINERS_CONF), **os.environ}


def bake_targets() -> dict[str, dict]:
    """The default group's targets, their tags resolved (REGISTRY / TAG: environment, else bake defaults)."""
    bake = json.loads(BAKE.read_text())
    variables = {k: os.environ.get(k, v.get("default", "")) for k, v in bake.get("variable", {}).items()}
    targets = {}
    for name in bake["group"]["default"]["targets"]:
        spec: dict = {}
        for parent in bake["target"][name].get("inherits", []):
            spec.update(bake["target"][parent])
        spec.update(bake["target"][name])
        spec["tags"] = [re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], t) for t in spec["tags"]]
        targets[name] = spec
    return targets


def image_refs() -> dict[str, str]:
    """name -> the image reference `make images` builds (the bake file's first tag; redis's stand-in)."""
    return {**{name: spec["tags"][0] for name, spec in bake_targets().items()}, "redis": REDIS_IMAGE}


def build_command(name: str, base: str, wheelhouse: Path) -> list[str]:
    """The podman build command line of one image."""
    if name == "redis":
        return ["podman", "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                "-f", "docker/redis.Dockerfile", "-t", REDIS_IMAGE, "."]
    spec = bake_targets()[name]
    cmd = ["podman", "build", "--format", "docker", "--network", "none",
           "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "PIP_OFFLINE=1",
           "--build-context", f"wheelhouse={wheelhouse}", "-f", spec["dockerfile"]]
    for key, value in spec.get("args", {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    for tag in spec["tags"]:
        cmd += ["-t", tag]
    return [*cmd, spec.get("context", ".")]


def image_size(ref: str) -> int:
    """Uncompressed size of a local image in bytes."""
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", ref], capture_output=True,
                         text=True, check=True, env=podman_env()).stdout
    return int(out.strip())


def build(names: list[str], base: str, wheelhouse: Path) -> dict[str, dict]:
    """Build each image in turn (stops at the first failure); name -> {ref, seconds, size_mb}."""
    if not (wheelhouse / ".complete").exists():
        sys.exit(f"{wheelhouse} is missing or incomplete: run `make wheelhouse`")
    results = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    refs = image_refs()
    for name in names:
        start = time.monotonic()
        print(f"== {name}: {' '.join(build_command(name, base, wheelhouse))}", flush=True)
        subprocess.run(build_command(name, base, wheelhouse), cwd=ROOT, env=podman_env(), check=True)
        seconds = time.monotonic() - start
        results[name] = {"ref": refs[name], "seconds": round(seconds, 1),
                         "size_mb": round(image_size(refs[name]) / 1e6)}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| image | size | build time (this run) |\n|---|---|---|")
    for name in names:
        r = results[name]
        print(f"| `{r['ref']}` | {r['size_mb']} MB | {r['seconds']:.0f} s |")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build images with podman, offline")
    b.add_argument("names", nargs="*", help="bake targets and/or redis (default: all)")
    b.add_argument("--base", default=BASE_IMAGE, help="base image (default: %(default)s)")
    b.add_argument("--wheelhouse", type=Path, default=WHEELHOUSE)
    sub.add_parser("names", help="print NAME=IMAGE for every image")
    args = parser.parse_args(argv)
    if args.command == "names":
        print("\n".join(f"{k}={v}" for k, v in image_refs().items()))
        return
    known = image_refs()
    names = args.names or list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown image(s) {unknown}; known: {sorted(known)}")
    build(names, args.base, args.wheelhouse)


if __name__ == "__main__":
    main()
