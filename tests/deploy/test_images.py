"""The Dockerfiles and their build targets: structure, the offline build recipe, hadolint, plus the HEALTHCHECK
commands run for real against a real service and a real Envoy. The images built and run under podman:
tests/deploy/test_containers.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.deploy.conftest import run, tool
from tests.support.procs import ROOT, GatewayProcess, free_port

DOCKERFILES = {"service": ROOT / "docker" / "service.Dockerfile", "gateway": ROOT / "docker" / "gateway.Dockerfile"}
# The compose stack's Redis where the official image cannot be pulled (make images).
REDIS_DOCKERFILE = ROOT / "docker" / "redis.Dockerfile"
PINNED = re.compile(r"^[a-z0-9./-]+:(\d+\.\d+\.\d+[\w.-]*)$|^[a-z0-9./-]+@sha256:[0-9a-f]{64}$")


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def arg_defaults(ins: list[tuple[str, str]]) -> dict[str, str]:
    """ARG NAME=default of a Dockerfile (the first default of each name)."""
    found: dict[str, str] = {}
    for op, args in ins:
        if op == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            found.setdefault(name.strip(), value.strip())
    return found


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_pinned_bases_non_root_with_healthcheck(kind):
    ins = instructions(DOCKERFILES[kind])
    defaults = arg_defaults(ins)
    froms = [args.split() for op, args in ins if op == "FROM"]
    stages = {f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    assert len(froms) >= 3, "multi-stage: a build stage and a runtime stage"
    for f in froms:
        # A base is an earlier stage (possibly chosen by a build arg), an image pinned to an exact version (also as
        # a build argument's default), or scratch (the empty wheelhouse stage).
        base = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), ""), f[0])
        assert base in stages or base == "scratch" or PINNED.match(base), f"{kind}: base {f[0]!r} is not pinned"
    runtime = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    after = ins[runtime:]
    users = [args for op, args in after if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{kind}: runs as {users}"
    assert any(op == "HEALTHCHECK" for op, _ in ins)
    assert any(op == "COPY" and "--from=build" in args for op, args in after), "runtime copies from the build stage"


def test_hadolint_passes_with_only_the_justified_ignores(tmp_path):
    config = ROOT / "docker" / "hadolint.yaml"
    proc = run([tool("hadolint"), "--config", str(config), *map(str, DOCKERFILES.values()), str(REDIS_DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ...and it does lint: a floating base and a root user are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\nUSER root\n")
    proc = run([tool("hadolint"), "--config", str(config), str(bad)])
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3002" in proc.stdout


def test_service_image_installs_runtime_dependencies_only():
    ins = instructions(DOCKERFILES["service"])
    text = "\n".join(args for _, args in ins)  # instructions only, comments dropped
    assert "[build]" not in text and "requirements-dev" not in text  # no training or test packages
    install = next(args for op, args in ins if op == "RUN" and "/opt/venv/bin/pip install" in args)
    assert '"./services/${SERVICE}"' in install and '"./libs[${VARIANT}]"' in install
    assert "onnxruntime-gpu" in text and "download.pytorch.org/whl/cu" in text  # the GPU variant's runtimes
    assert "model_repository" not in text  # models come from a volume, never the image


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_builds_offline_from_a_wheelhouse_on_a_base_given_as_build_argument(kind):
    """Default: the official slim image and PyPI. Air-gapped (make images): PYTHON_IMAGE names a local base,
    `--build-context wheelhouse=<dir>` replaces the empty wheelhouse stage and PIP_OFFLINE=1 keeps pip off the
    network: every pip install in the build mounts the wheelhouse and honours it."""
    ins = instructions(DOCKERFILES[kind])
    assert arg_defaults(ins)["PYTHON_IMAGE"] == "python:3.11.14-slim-bookworm"
    froms = [args for op, args in ins if op == "FROM"]
    assert "scratch AS wheelhouse" in froms
    assert any(f.startswith("${PYTHON_IMAGE} AS ") for f in froms)
    if kind == "service":  # the GPU variant keeps its CUDA base
        assert "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS python-gpu" in froms
    installs = [args for op, args in ins if op == "RUN" and "pip install" in args]
    assert installs
    for install in installs:
        assert install.startswith("--mount=type=bind,from=wheelhouse,target=/wheels "), install
        for command in re.findall(r"/pip install [^&]*", install):
            assert "${PIP_OFFLINE:+--no-index}" in command, command
    assert any(op == "ENV" and "PIP_FIND_LINKS=/wheels" in args for op, args in ins)


def test_build_context_leaves_models_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("model_repository", ".git", "protos/gen", ".dev", "**/.venv*", "*/build", "*/*/build"):
        assert entry in ignored


def test_a_bake_target_per_service_and_gpu_variant(services, deploy_cfg):
    bake = json.loads((ROOT / "docker" / "docker-bake.json").read_text())
    targets = bake["target"]
    for name, svc in services.items():
        assert targets[name]["args"] == {"SERVICE": name, "VARIANT": "cpu"}
        assert targets[name]["tags"] == [f"${{REGISTRY}}/{name}:${{TAG}}"]
        if svc["gpu"]:
            assert targets[f"{name}-gpu"]["args"] == {"SERVICE": name, "VARIANT": "gpu"}
        else:
            assert f"{name}-gpu" not in targets
    assert targets["gateway"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert bake["variable"]["TAG"]["default"] == deploy_cfg["image_tag"] != "latest"


def healthcheck(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlplatform.healthcheck", *args], capture_output=True, text=True,
                          timeout=30, env=env, cwd=ROOT)


@pytest.mark.integration
def test_service_healthcheck_asks_grpc_health_on_the_services_own_port(fraud_service):
    """The image's HEALTHCHECK command: SERVING -> 0; unknown service or nothing listening -> 1."""
    import os

    env = {**os.environ, "FRAUD_GRPC_PORT": str(fraud_service.port)}
    ok = healthcheck("--module", "fraud_service", env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"127.0.0.1:{fraud_service.port} (overall): SERVING" in ok.stdout
    typed = healthcheck("--module", "fraud_service", "--service", "fraud.v1.FraudService", env=env)
    assert typed.returncode == 0, typed.stderr
    unknown = healthcheck("--module", "fraud_service", "--service", "nope.v1.Nope", env=env)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    down = healthcheck("--module", "fraud_service", "--timeout", "0.5",
                       env={**os.environ, "FRAUD_GRPC_PORT": str(free_port())})
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    bad = healthcheck("--module", "fraud_service", env={**os.environ, "FRAUD_GRPC_PORT": "notaport"})
    assert bad.returncode == 2 and "FRAUD_GRPC_PORT" in bad.stderr


@pytest.mark.integration
def test_gateway_healthcheck_reads_envoys_ready(fraud_service, tmp_path):
    from mlplatform_gateway import auth

    key = auth.ensure_dev_keys(tmp_path / "keys")
    gw = GatewayProcess({"fraud": [fraud_service.target]}, key.jwks_path).start()
    try:
        cmd = [sys.executable, "-m", "mlplatform_gateway", "ready", "--admin-port"]
        up = subprocess.run([*cmd, str(gw.admin_port)], capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, up.stderr
    finally:
        gw.stop()
    down = subprocess.run([*cmd, str(gw.admin_port)], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "not ready" in down.stderr
