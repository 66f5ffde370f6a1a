"""cnn test fixtures: the held-out digits written by the build, and the ONNX model run directly."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cnn.v1 import cnn_pb2_grpc as rpc

from tests.support.procs import ServiceProcess


@pytest.fixture(scope="session")
def cnn_dir(model_repository: Path) -> Path:
    return model_repository / "cnn" / "1"


@pytest.fixture(scope="session")
def cnn_config(cnn_dir: Path) -> dict:
    return json.loads((cnn_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def heldout(cnn_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The build's held-out split: uint8 images [N, 32, 32] and their labels."""
    data = np.load(cnn_dir / "heldout.npz")
    return data["images"], data["labels"]


@pytest.fixture(scope="session")
def onnx_probabilities(cnn_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The cnn ONNX model run directly with ONNX Runtime: pixels [N, 32, 32] (0-255) -> probabilities [N, 10]."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(cnn_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(pixels: np.ndarray) -> np.ndarray:
        return sess.run(["probabilities"], {"image": np.asarray(pixels, dtype=np.float32)[:, None]})[0]

    return run


@pytest.fixture(scope="session")
def cnn_stub(cnn_service: ServiceProcess) -> Iterator[rpc.CnnServiceStub]:
    """A typed stub straight to the shared cnn service."""
    with grpc.insecure_channel(cnn_service.target) as channel:
        yield rpc.CnnServiceStub(channel)
