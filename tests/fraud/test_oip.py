"""Open Inference Protocol v2 with tritonclient (a client we did not write) against the fraud service."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.fraud.helpers import perturb, predict_request, stub

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(fraud_service):
    c = tc.InferenceServerClient(fraud_service.target)
    yield c
    c.close()


def _infer_input(rows: np.ndarray, datatype: str = "FP32", name: str = "features") -> tc.InferInput:
    inp = tc.InferInput(name, list(rows.shape), datatype)
    inp.set_data_from_numpy(rows)
    return inp


def test_server_and_model_status(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud")
    assert client.is_model_ready("fraud", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "mlplatform" and "model_configuration" in meta["extensions"]


def test_model_metadata_and_config(client, model_repository):
    meta = client.get_model_metadata("fraud", as_json=True)
    assert meta["name"] == "fraud" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "30"]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"label": "INT64", "probabilities": "FP32"}
    config = client.get_model_config("fraud", as_json=True)["config"]
    assert config["name"] == "fraud"
    assert config["max_batch_size"] == 256
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": ["30"]}]
    assert {o["name"]: o.get("dims", []) for o in config["output"]} == {"label": [], "probabilities": ["2"]}
    assert int(config["dynamic_batching"].get("max_queue_delay_microseconds", 0)) == 0
    assert config["dynamic_batching"]["preferred_batch_size"] == [32, 64, 128, 256]


def test_model_infer_matches_typed_api_and_onnx(client, fraud_service, fraud_rows, onnx_reference):
    rows = perturb(fraud_rows[0][700:764], seed=11)
    result = client.infer("fraud", [_infer_input(rows)],
                          outputs=[tc.InferRequestedOutput("probabilities"), tc.InferRequestedOutput("label")])
    probs = result.as_numpy("probabilities")
    labels = result.as_numpy("label")
    assert probs.shape == (64, 2) and probs.dtype == np.float32 and labels.shape == (64,)
    np.testing.assert_allclose(probs[:, 1], onnx_reference(rows), atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    channel, typed = stub(fraud_service.target)
    with channel:
        typed_preds = [typed.Predict(predict_request(r), timeout=10).prediction for r in rows]
    np.testing.assert_allclose(probs[:, 1], [p.fraud_probability for p in typed_preds], atol=1e-7)
    assert labels.tolist() == [int(p.is_fraud) for p in typed_preds]
    response = result.get_response()
    assert response.model_name == "fraud" and response.model_version == "1"


def test_model_infer_default_outputs_and_version(client, fraud_rows):
    rows = perturb(fraud_rows[0][800:803], seed=12)
    result = client.infer("fraud", [_infer_input(rows)], model_version="1")
    assert result.as_numpy("probabilities").shape == (3, 2)
    assert result.as_numpy("label").shape == (3,)


def test_bad_requests_are_refused_with_the_right_status(client, fraud_rows):
    rows = fraud_rows[0][:4]
    cases = [
        ("fraud", [_infer_input(rows[:, :29])], "", "StatusCode.INVALID_ARGUMENT",
         "input 'features': shape [4, 29] does not match [N, 30]"),
        ("fraud", [_infer_input(rows.astype(np.float64), "FP64")], "", "StatusCode.INVALID_ARGUMENT",
         "input 'features': datatype must be FP32"),
        ("fraud", [_infer_input(rows[0])], "", "StatusCode.INVALID_ARGUMENT",
         "input 'features': shape [30] does not match [N, 30]"),
        ("fraud", [_infer_input(rows, name="x")], "", "StatusCode.INVALID_ARGUMENT",
         "missing input tensor(s) ['features']; expected ['features']"),
        ("nope", [_infer_input(rows)], "", "StatusCode.NOT_FOUND", "unknown model 'nope'; served: ['fraud']"),
        ("fraud", [_infer_input(rows)], "3", "StatusCode.NOT_FOUND",
         "model 'fraud' has no version '3' served; served version: 1"),
        ("fraud", [_infer_input(np.zeros((0, 30), np.float32))], "", "StatusCode.INVALID_ARGUMENT",
         "empty batch: at least one row is required"),
        ("fraud", [_infer_input(np.zeros((257, 30), np.float32))], "", "StatusCode.INVALID_ARGUMENT",
         "batch of 257 rows is over the limit of 256"),
    ]
    for model, inputs, version, status, message in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs, model_version=version)
        assert err.value.status() == status, (model, message)
        assert err.value.message() == message
    bad = rows.copy()
    bad[2, 13] = 2.0  # new_device is 0/1
    with pytest.raises(InferenceServerException) as err:
        client.infer("fraud", [_infer_input(bad)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message() == "invalid input: row 2: features[13] (new_device) = 2 is outside [0, 1]"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_stream_infer(client, fraud_rows, onnx_reference):
    rows = perturb(fraud_rows[0][900:910], seed=13)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(10):
            client.async_stream_infer("fraud", [_infer_input(rows[i:i + 1])], request_id=str(i))
        client.async_stream_infer("fraud", [_infer_input(rows[:1, :5])], request_id="bad")
        got = [results.get(timeout=10) for _ in range(11)]
    finally:
        client.stop_stream()
    ok = {r.get_response().id: r.as_numpy("probabilities")[0, 1] for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(ok, key=int) == [str(i) for i in range(10)]
    np.testing.assert_allclose([ok[str(i)] for i in range(10)], onnx_reference(rows), atol=1e-6)
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0].message() and "[1, 5]" in errors[0].message()
