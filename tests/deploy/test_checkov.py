"""checkov over k8s/ and the Dockerfiles: no finding but the skipped ones, each justified in a file."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.deploy.conftest import run, tool
from tests.support.procs import ROOT

SKIPS = yaml.safe_load((ROOT / "deploy" / "checkov-skips.yaml").read_text())["skips"]


def failed_checks(framework: str, directory: str) -> tuple[dict[str, list[str]], int]:
    """check id -> resources failing it, and the number of passed checks (offline: --skip-download)."""
    proc = run([tool("checkov"), "-d", directory, "--framework", framework, "--output", "json", "--quiet",
                "--skip-download", "--compact"], timeout=300, env={"BC_SKIP_MAPPING": "TRUE", "PATH": str(
                    ROOT / ".venv-tools" / "bin") + ":/usr/bin:/bin", "HOME": str(ROOT / ".venv-tools")})
    assert proc.stdout.strip(), proc.stderr
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed: dict[str, list[str]] = {}
    passed = 0
    for report in reports:
        passed += report["summary"]["passed"]
        for check in report["results"]["failed_checks"]:
            failed.setdefault(check["check_id"], []).append(f"{check['resource']} ({check['file_path']})")
    return failed, passed


def test_every_skip_is_justified():
    for skip in SKIPS:
        assert skip["id"].startswith("CKV_") and skip["framework"] in ("kustomize", "dockerfile")
        assert len(skip["reason"]) > 80, f"{skip['id']}: say why"


@pytest.mark.parametrize(("framework", "directory"), [("kustomize", "k8s"), ("dockerfile", "docker")])
def test_checkov_finds_nothing_but_the_skipped_checks(framework, directory):
    failed, passed = failed_checks(framework, directory)
    skipped = {s["id"] for s in SKIPS if s["framework"] == framework}
    unexpected = {k: v for k, v in failed.items() if k not in skipped}
    assert not unexpected, f"checkov findings in {directory}/: {json.dumps(unexpected, indent=1)}"
    assert set(failed) == skipped, f"stale skips in deploy/checkov-skips.yaml: {skipped - set(failed)}"
    assert passed > (500 if framework == "kustomize" else 50)
