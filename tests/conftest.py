"""Shared fixtures: the real model repository, a real Redis, real fraud and cnn service processes.

Never import the generated `inference` stubs (or mlplatform.oip / mlplatform.server)
in the test process: tritonclient registers the same Open Inference Protocol symbols
and protobuf refuses duplicates. Services run as subprocesses, so tests talk to them
over the wire like any client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.procs import ROOT, RedisServer, ServiceProcess

MODEL_REPOSITORY = Path(os.environ.get("TEST_MODEL_REPOSITORY", ROOT / "model_repository"))


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The project's model repository: every model of deploy/services.yaml, built (deterministically) if missing."""
    from deploy import catalog

    catalog.build_all(MODEL_REPOSITORY)
    return MODEL_REPOSITORY


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


FUNCTIONAL_BUDGET_MS = "5000"
"""Latency budget of the shared CPU-heavy services: functional tests send bursts (a batch of 64 texts, 32 images)
that this 2-core machine clears in more than the production budget (sentiment 160 ms), so admission control
would refuse part of them. Shedding has its own tests (tests/libs/test_admission.py, tests/generic/test_admission.py);
the fraud service keeps its production budget."""


@pytest.fixture(scope="session")
def fraud_service(model_repository: Path, redis_server: RedisServer) -> Iterator[ServiceProcess]:
    """A fraud service with the Redis cache, shared by tests that do not stop it."""
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository),
        "REDIS_URL": redis_server.url,
    }).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def cnn_service(model_repository: Path) -> Iterator[ServiceProcess]:
    """A cnn service shared by tests that do not stop it. No prediction cache: every request reaches the
    batcher, so batch-size and queue-wait metrics count every request (the cache is tested with fraud)."""
    svc = ServiceProcess("cnn_service", "CNN_", env={
        "CNN_MODEL_REPOSITORY": str(model_repository),
        "CNN_CACHE_ENABLED": "false",
        "CNN_LATENCY_BUDGET_MS": FUNCTIONAL_BUDGET_MS,
    }).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def generic_service(model_repository: Path) -> Iterator[ServiceProcess]:
    """The generic model service with the config-only models of deploy/services.yaml."""
    from deploy import catalog

    models = ",".join(m for m, svc in catalog.models().items() if svc.config_only)
    svc = ServiceProcess("generic_service", "GENERIC_", env={
        "GENERIC_MODEL_REPOSITORY": str(model_repository), "GENERIC_MODELS": models}).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def fraud_rows() -> tuple[np.ndarray, np.ndarray]:
    """Fresh rows from the same generator as the training data (another seed), with labels."""
    from fraud_service.build_model import generate_dataset

    x, y = generate_dataset(4000, seed=2024)
    return x.astype(np.float32), y


@pytest.fixture(scope="session")
def onnx_reference(model_repository: Path):
    """The fraud ONNX model run directly with ONNX Runtime: rows -> fraud probability."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_repository / "fraud" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])

    def predict(rows: np.ndarray) -> np.ndarray:
        return sess.run(["probabilities"], {"features": rows.astype(np.float32)})[0][:, 1]

    return predict


@pytest.fixture(scope="session")
def sentiment_service(model_repository: Path) -> Iterator[ServiceProcess]:
    """A sentiment service (TorchScript on CPU, in-process cache), shared by tests that do not stop it."""
    svc = ServiceProcess("sentiment_service", "SENTIMENT_", env={
        "SENTIMENT_MODEL_REPOSITORY": str(model_repository),
        "SENTIMENT_LATENCY_BUDGET_MS": FUNCTIONAL_BUDGET_MS,
    }).start(timeout=180)
    yield svc
    svc.stop()
