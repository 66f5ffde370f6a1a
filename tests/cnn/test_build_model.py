"""The cnn model build: quality, ONNX parity, native formats and determinism of what `make models` writes."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from mlplatform.repository import ModelRepository


def test_config_records_quality_parity_and_the_serving_contract(model_repository: Path, heldout):
    config = ModelRepository(model_repository).resolve("cnn").config
    params = config.parameters
    metrics = params["metrics"]
    assert metrics["heldout_accuracy"] > 0.97
    assert metrics["heldout_images"] == len(heldout[1]) == 360
    assert metrics["heldout_correct"] == round(metrics["heldout_accuracy"] * metrics["heldout_images"])
    assert 0 <= metrics["parity_max_abs_diff"] <= 1e-4
    assert params["labels"] == [str(d) for d in range(10)]
    assert (params["input"]["height"], params["input"]["width"]) == (32, 32)
    assert [(s.name, s.datatype, s.shape) for s in config.inputs] == [("image", "FP32", (-1, 1, 32, 32))]
    assert config.batching.max_queue_delay_ms == 20 and config.batching.max_batch_size == 32
    assert config.batching.preferred_batch_sizes == [8, 16, 32]
    assert config.warmup.batch_sizes == [1, 8, 16, 32]
    assert config.runtime.providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_onnx_has_a_dynamic_batch_axis_and_reproduces_the_recorded_accuracy(cnn_dir: Path, cnn_config, heldout,
                                                                             onnx_probabilities):
    graph = onnx.load(str(cnn_dir / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    images, labels = heldout
    for n in (1, 7, 32):
        assert onnx_probabilities(images[:n]).shape == (n, 10)
    correct = int((onnx_probabilities(images).argmax(1) == labels).sum())
    assert correct == cnn_config["parameters"]["metrics"]["heldout_correct"]


def test_state_dict_and_torchscript_give_the_onnx_answers(cnn_dir: Path, cnn_config, heldout, onnx_probabilities):
    import torch

    from cnn_service.build_model import make_network

    images = heldout[0][:16]
    expected = onnx_probabilities(images)
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    norm = cnn_config["parameters"]["normalisation"]
    net = make_network(norm["mean"], norm["std"])
    net.load_state_dict(torch.load(cnn_dir / "model.pt", weights_only=True))
    net.eval()
    with warnings.catch_warnings():  # torch.jit is deprecated in 2.13; the file format is still what users load
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(cnn_dir / "model.torchscript.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(net(x)[1].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(scripted(x)[1].numpy(), expected, atol=1e-5)


def test_build_is_deterministic_and_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cnn_service.build_model import build

    a = build(tmp_path / "a", version=1, seed=42, epochs=4)
    b = build(tmp_path / "b", version=1, seed=42, epochs=4)
    for name in ("model.onnx", "model.pt", "heldout.npz", "sample.png"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (a, b)]
        assert digest[0] == digest[1], name
    ma, mb = (json.loads((d / "config.json").read_text())["parameters"]["metrics"] for d in (a, b))
    assert ma == mb
    out = capsys.readouterr().out
    assert "epoch  4/4" in out and "max abs diff" in out and "held-out accuracy" in out
    mtime = (a / "model.onnx").stat().st_mtime_ns
    build(tmp_path / "a", version=1, seed=42, epochs=4)  # up to date: nothing rebuilt
    assert "up to date" in capsys.readouterr().out
    assert (a / "model.onnx").stat().st_mtime_ns == mtime
