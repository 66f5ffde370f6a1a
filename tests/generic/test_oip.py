"""The generic model service with the config-only `diabetes` model, over the Open Inference Protocol with
tritonclient (a client we did not write): answers equal ONNX Runtime's, config-declared limits refuse bad
rows naming the column, one bad stream message never harms the others, metrics carry the model's name."""

from __future__ import annotations

import json
import queue
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(generic_service: ServiceProcess) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(generic_service.target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def diabetes(model_repository: Path) -> tuple[np.ndarray, object]:
    """Held-out rows of the build's sample and the ONNX model run directly with ONNX Runtime."""
    import onnxruntime as ort

    version = model_repository / "diabetes" / "1"
    rows = np.asarray([r["features"] for r in json.loads((version / "sample.json").read_text())["rows"]], np.float32)
    return rows, ort.InferenceSession(str(version / "model.onnx"))


def _input(rows: np.ndarray, datatype: str = "FP32") -> tc.InferInput:
    inp = tc.InferInput("features", list(rows.shape), datatype)
    inp.set_data_from_numpy(rows)
    return inp


def test_metadata_and_config_come_from_config_json(client):
    assert client.is_server_ready() and client.is_model_ready("diabetes", "1")
    meta = client.get_model_metadata("diabetes", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("diabetes", as_json=True)["config"]
    assert config["max_batch_size"] == 64 and config["dynamic_batching"]["preferred_batch_size"] == [8, 32, 64]


def test_infer_equals_onnx_runtime(client, diabetes):
    rows, session = diabetes
    batch = np.repeat(rows, 8, axis=0)[:37]
    got = client.infer("diabetes", [_input(batch)]).as_numpy("progression")
    expected = session.run(None, {"features": batch})[0]
    assert got.shape == (37, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize(("rows", "datatype", "message"), [
    (lambda r: np.vstack([r[:1], np.where(np.arange(10) == 0, 200.0, r[1]).astype(np.float32)[None]]), "FP32",
     "invalid input: row 1: features[0] (age) = 200 is outside [0, 109]"),
    (lambda r: np.where(np.arange(10) == 2, np.nan, r[0]).astype(np.float32)[None], "FP32",
     "invalid input: row 0: features element 2 is nan, not a finite number"),
    (lambda r: r[:, :9], "FP32", "input 'features': shape [5, 9] does not match [N, 10]"),
    (lambda r: r.astype(np.float64), "FP64", "input 'features': datatype must be FP32"),
    (lambda r: np.repeat(r, 13, axis=0), "FP32", "batch of 65 rows is over the limit of 64"),
])
def test_bad_requests_get_invalid_argument_naming_the_field(client, diabetes, rows, datatype, message):
    with pytest.raises(InferenceServerException) as err:
        client.infer("diabetes", [_input(rows(diabetes[0]), datatype)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message() == message


def test_unknown_model_is_not_found(client, diabetes):
    with pytest.raises(InferenceServerException) as err:
        client.infer("fraud", [_input(diabetes[0])])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert err.value.message() == "unknown model 'fraud'; served: ['diabetes']"


def test_stream_answers_in_order_and_a_bad_message_only_fails_itself(client, diabetes):
    rows, session = diabetes
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        bad = np.where(np.arange(10) == 1, 3.0, rows[0]).astype(np.float32)[None]  # sex must be 1..2
        for i, batch in enumerate([rows[:2], bad, rows[2:5]]):
            client.async_stream_infer("diabetes", [_input(batch)], request_id=str(i))
        answers = [results.get(timeout=10) for _ in range(3)]
    finally:
        client.stop_stream()
    first, second, third = answers
    np.testing.assert_allclose(first[0].as_numpy("progression"), session.run(None, {"features": rows[:2]})[0],
                               rtol=1e-6)
    assert second[1] is not None and "features[1] (sex) = 3 is outside [1, 2]" in str(second[1])
    np.testing.assert_allclose(third[0].as_numpy("progression"), session.run(None, {"features": rows[2:5]})[0],
                               rtol=1e-6)


def test_metrics_carry_the_models_name(client, generic_service, diabetes):
    client.infer("diabetes", [_input(diabetes[0])])
    with urllib.request.urlopen(f"http://127.0.0.1:{generic_service.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'inference_requests_total{method="ModelInfer",model="diabetes",status="OK",version="1"}' in text
    assert 'inference_model_ready{model="diabetes",version="1"} 1.0' in text
