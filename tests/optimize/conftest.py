"""The optimisation toolkit's quick run on the real cnn model, once per session (a subprocess, like make optimize)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import ROOT


@pytest.fixture(scope="session")
def cnn_quick(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """(report.json, output directory) of `python -m mlplatform.optimize --model cnn --quick`."""
    out = tmp_path_factory.mktemp("optimize")
    proc = subprocess.run(
        [sys.executable, "-m", "mlplatform.optimize", "--model", "cnn", "--quick", "--out", str(out),
         "--version-dir", str(model_repository / "cnn" / "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "cnn" / "report.json").read_text()), out / "cnn"
