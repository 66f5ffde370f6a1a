"""Podman and the model calls for the container tests (tests/deploy/test_containers.py).

Podman runs as root with the project's containers.conf (docker/podman/containers.conf: runc, lowered ulimits,
netavark) unless CONTAINERS_CONF names another. Images come from `make images` (docker/images.py): a test
fails, never skips, when one is missing. Healthchecks: podman 4.3 schedules HEALTHCHECKs with systemd timers,
which a machine without systemd lacks, so the tests run each check with `podman healthcheck run` (what the
timer would do) until it passes.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.procs import ROOT

CONTAINERS_CONF = ROOT / "docker" / "podman" / "containers.conf"
PODMAN_COMPOSE = ROOT / ".venv-tools" / "bin" / "podman-compose"
# make test: the fraud + gateway stack (and Redis); make compose-test (MLPLATFORM_STACK=all): every service.
STACK = os.environ.get("MLPLATFORM_STACK", "fraud")


def env() -> dict[str, str]:
    return {"CONTAINERS_CONF": str(CONTAINERS_CONF), **os.environ}


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """One podman command; fails the test (with podman's output) when `check` and it fails."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make system-deps`")
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def image_refs() -> dict[str, str]:
    """name -> image reference, as `make images` tags them (docker/images.py)."""
    spec = importlib.util.spec_from_file_location("mlplatform_docker_images", ROOT / "docker" / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.image_refs()


def require_image(ref: str) -> None:
    if podman("image", "exists", ref, check=False).returncode != 0:
        pytest.fail(f"image {ref} is missing: run `make images` (or `make test-images`)")


def in_stack(name: str) -> bool:
    """Whether this run brings up `name` (fraud and the gateway always; the others with MLPLATFORM_STACK=all)."""
    return STACK == "all" or name in ("fraud", "gateway", "redis")


def wait_healthy(container: str, timeout: float) -> None:
    """Run the container's HEALTHCHECK until it passes; fail with its logs when it exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            logs = podman("logs", "--tail", "40", container, check=False)
            pytest.fail(f"{container} is {state!r}:\n{logs.stdout}{logs.stderr}")
        check = podman("healthcheck", "run", container, check=False, timeout=30)
        if check.returncode == 0:
            return
        last = check.stdout + check.stderr
        time.sleep(2)
    logs = podman("logs", "--tail", "40", container, check=False)
    pytest.fail(f"{container} not healthy after {timeout:.0f} s ({last.strip()}):\n{logs.stdout}{logs.stderr}")


# --- one prediction per model, typed gRPC (or OIP for config-only models) and REST ---------------------------


def sample(model: str, repository: Path) -> Any:
    """An input for `model` from its build's sample: feature row, PNG bytes or text."""
    version = repository / model / "1"
    if model == "cnn":
        return (version / "sample.png").read_bytes()
    data = json.loads((version / "sample.json").read_text())
    if model == "sentiment":
        return data["texts"][0]
    return data["rows"][0]["features"]


def grpc_predict(target: str, model: str, repository: Path, metadata: list[tuple[str, str]] | None = None,
                 ca: bytes | None = None) -> str:
    """One typed Predict (OIP ModelInfer for config-only models) on `target` (over TLS trusting `ca` when given);
    the model name that answered."""
    value = sample(model, repository)
    channel_of = (lambda t: grpc.secure_channel(t, grpc.ssl_channel_credentials(ca))) if ca else grpc.insecure_channel
    with channel_of(target) as channel:
        if model == "fraud":
            from fraud.v1 import fraud_pb2, fraud_pb2_grpc

            tx = fraud_pb2.Transaction(transaction_id="c-1", features=value)
            resp = fraud_pb2_grpc.FraudServiceStub(channel).Predict(
                fraud_pb2.PredictRequest(transaction=tx), metadata=metadata, timeout=30)
            assert 0.0 <= resp.prediction.fraud_probability <= 1.0
            return resp.prediction.model_name
        if model == "cnn":
            from cnn.v1 import cnn_pb2, cnn_pb2_grpc

            resp = cnn_pb2_grpc.CnnServiceStub(channel).Predict(cnn_pb2.PredictRequest(image=value, top_k=3),
                                                               metadata=metadata, timeout=30)
            assert len(resp.classification.classes) == 3
            return resp.classification.model_name
        if model == "sentiment":
            from sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc

            resp = sentiment_pb2_grpc.SentimentServiceStub(channel).Predict(
                sentiment_pb2.PredictRequest(text=value), metadata=metadata, timeout=30)
            assert resp.prediction.label
            return resp.prediction.model_name
    return oip_infer(target, model, value, metadata, ca)


def oip_infer(target: str, model: str, features: list[float], metadata: list[tuple[str, str]] | None,
              ca: bytes | None = None) -> str:
    """ModelInfer with tritonclient (a client we did not write), FP32 [1, n]; over TLS trusting `ca` when given."""
    import numpy as np
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(target, creds=grpc.ssl_channel_credentials(ca) if ca else None)
    try:
        rows = np.asarray([features], np.float32)
        inp = tc.InferInput(client.get_model_metadata(model, headers=dict(metadata or [])).inputs[0].name,
                            list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        result = client.infer(model, [inp], headers=dict(metadata or []), client_timeout=30)
        assert result.as_numpy(result.get_response().outputs[0].name).size >= 1
        return result.get_response().model_name
    finally:
        client.close()


def rest_predict(base_url: str, model: str, repository: Path, token: str, context: ssl.SSLContext | None = None) -> str:
    """POST /api/v1/<model> through the gateway (https: `context` trusts its CA); the model name that answered."""
    import urllib.request

    value = sample(model, repository)
    if model == "fraud":
        body: dict[str, Any] = {"transaction": {"transaction_id": "r-1", "features": value}}
    elif model == "cnn":
        body = {"image": base64.b64encode(value).decode(), "top_k": 3}
    elif model == "sentiment":
        body = {"text": value}
    else:
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(value)],
                            "contents": {"fp32_contents": value}}]}
    req = urllib.request.Request(f"{base_url}/api/v1/{model}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30, context=context) as resp:
        assert resp.status == 200
        answer = json.loads(resp.read())
    inner = next(iter(answer.values())) if model in ("fraud", "cnn", "sentiment") else answer
    return inner.get("modelName") or inner.get("model_name")
