"""Clients and references for the gRPC property tests.

Hypothesis profiles (tests/fuzz/strategies.py, applied per test): `ci`, the default (`make test`): a few hundred
examples in all, derandomized (the same examples on every run, so a failure reproduces); `long`
(`HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/fuzz`, for `make chaos`): twenty times as many, freshly drawn
each run. A failing example is printed in full by Hypothesis, with the statuses seen (`note`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest


def _channel(target: str) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20),
                                                     ("grpc.max_send_message_length", 64 << 20)])
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def fraud_channel(fraud_service) -> Iterator[grpc.Channel]:
    yield from _channel(fraud_service.target)


@pytest.fixture(scope="module")
def cnn_channel(cnn_service) -> Iterator[grpc.Channel]:
    yield from _channel(cnn_service.target)


@pytest.fixture(scope="module")
def sentiment_channel(sentiment_service) -> Iterator[grpc.Channel]:
    yield from _channel(sentiment_service.target)


@pytest.fixture(scope="session")
def fraud_bounds(model_repository: Path) -> tuple[np.ndarray, np.ndarray]:
    """The fraud model's per-feature [min, max] from its config (what the service validates against)."""
    import json

    features = json.loads((model_repository / "fraud" / "1" / "config.json").read_text())["parameters"]["features"]
    return (np.array([f["min"] for f in features], np.float32), np.array([f["max"] for f in features], np.float32))


@pytest.fixture(scope="session")
def cnn_reference(model_repository: Path):
    """The cnn ONNX model run directly: pixels [N, 32, 32] (0-255) -> probabilities [N, 10]."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_repository / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def predict(pixels: np.ndarray) -> np.ndarray:
        return sess.run(["probabilities"], {"image": pixels.astype(np.float32)[:, np.newaxis]})[0]

    return predict
