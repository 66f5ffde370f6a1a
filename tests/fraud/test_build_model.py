"""The fraud model build: quality, parity and determinism of what `make models` writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mlplatform.repository import ModelRepository


def test_built_model_quality_and_config(model_repository: Path):
    version = ModelRepository(model_repository).resolve("fraud")
    config = version.config
    params = config.parameters
    metrics = params["metrics"]
    assert metrics["roc_auc"] > 0.95
    assert metrics["pr_auc"] > 0.5
    assert 0.01 <= metrics["fraud_rate"] <= 0.02
    assert metrics["parity_max_abs_diff"] < 1e-4
    assert 0 < params["threshold"] < 1
    assert len(params["features"]) == 30 == config.inputs[0].shape[1]
    assert all(f["min"] < f["max"] for f in params["features"])
    assert [o.name for o in config.outputs] == ["label", "probabilities"]


def test_sample_file_matches_the_served_model(model_repository: Path):
    import onnxruntime as ort

    sample = json.loads((model_repository / "fraud" / "1" / "sample.json").read_text())
    rows = np.array([r["features"] for r in sample["rows"]], dtype=np.float32)
    sess = ort.InferenceSession(str(model_repository / "fraud" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    probs = sess.run(["probabilities"], {"features": rows})[0][:, 1]
    np.testing.assert_allclose(probs, [r["expected_probability"] for r in sample["rows"]], atol=1e-6)
    assert sum(r["label"] for r in sample["rows"]) >= 5


def test_build_is_deterministic_and_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from fraud_service.build_model import build

    a = build(tmp_path / "a", version=1, seed=3, rows=40_000)
    b = build(tmp_path / "b", version=1, seed=3, rows=40_000)
    digest = [hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest() for d in (a, b)]
    assert digest[0] == digest[1]
    ma, mb = (json.loads((d / "config.json").read_text())["parameters"]["metrics"] for d in (a, b))
    assert ma == mb
    capsys.readouterr()
    mtime = (a / "model.onnx").stat().st_mtime_ns
    build(tmp_path / "a", version=1, seed=3, rows=40_000)  # up to date: nothing rebuilt
    assert "up to date" in capsys.readouterr().out
    assert (a / "model.onnx").stat().st_mtime_ns == mtime
