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
    for artifact in ("model.onnx", "model.ubj"):
        digest = [hashlib.sha256((d / artifact).read_bytes()).hexdigest() for d in (a, b)]
        assert digest[0] == digest[1], artifact
    ma, mb = (json.loads((d / "config.json").read_text())["parameters"]["metrics"] for d in (a, b))
    assert ma == mb
    capsys.readouterr()
    mtime = (a / "model.onnx").stat().st_mtime_ns
    build(tmp_path / "a", version=1, seed=3, rows=40_000)  # up to date: nothing rebuilt
    assert "up to date" in capsys.readouterr().out
    assert (a / "model.onnx").stat().st_mtime_ns == mtime


def test_native_xgboost_model_matches_the_onnx_model(model_repository: Path):
    """model.ubj (served by peers such as MLServer) holds the same trees as model.onnx."""
    import onnxruntime as ort
    from xgboost import XGBClassifier

    version_dir = model_repository / "fraud" / "1"
    sample = json.loads((version_dir / "sample.json").read_text())
    rng = np.random.default_rng(0)
    rows = np.array([r["features"] for r in sample["rows"]], dtype=np.float32)
    rows = np.concatenate([rows, rows * rng.uniform(0.5, 1.5, size=rows.shape).astype(np.float32)])
    native = XGBClassifier()
    native.load_model(version_dir / "model.ubj")
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_proba = sess.run(["probabilities"], {"features": rows})[0]
    native_proba = native.predict_proba(rows)
    assert native_proba.shape == onnx_proba.shape == (len(rows), 2)
    np.testing.assert_allclose(native_proba, onnx_proba, atol=1e-4)
    np.testing.assert_allclose(native_proba[: len(sample["rows"]), 1],
                               [r["expected_probability"] for r in sample["rows"]], atol=1e-4)
    assert native_proba[:, 1].std() > 0.01  # the rows are not all alike: the check compares real outputs
