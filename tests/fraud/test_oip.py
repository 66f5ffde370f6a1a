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


@pytest.fixture()
def raw_stub(fraud_service):
    """tritonclient's own generated stubs, for hand-made (and malformed) requests."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(fraud_service.target)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _request(rows: np.ndarray, *, raw: bool = True, datatype: str = "FP32", shape=None, outputs=()):
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name="fraud", id="r1")
    tensor = req.inputs.add(name="features", datatype=datatype, shape=list(shape or rows.shape))
    if raw:
        req.raw_input_contents.append(rows.astype(np.float32).tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    for name in outputs:
        req.outputs.add(name=name)
    return req


def test_typed_contents_give_the_same_answer_as_raw_bytes(raw_stub, fraud_rows, onnx_reference):
    rows = perturb(fraud_rows[0][1100:1105], seed=14)
    resp = raw_stub.ModelInfer(_request(rows, raw=False, outputs=["probabilities"]), timeout=10)
    assert resp.id == "r1" and [o.name for o in resp.outputs] == ["probabilities"]
    assert list(resp.outputs[0].shape) == [5, 2] and resp.outputs[0].datatype == "FP32"
    probs = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(5, 2)
    np.testing.assert_allclose(probs[:, 1], onnx_reference(rows), atol=1e-6)
    assert resp.parameters["cached_rows"].int64_param == 0
    again = raw_stub.ModelInfer(_request(rows, raw=True), timeout=10)
    assert again.parameters["cached_rows"].int64_param == 5  # same rows: answered from the cache
    assert again.raw_output_contents[list(o.name for o in again.outputs).index("probabilities")] == \
        resp.raw_output_contents[0]


def test_malformed_oip_requests_are_refused_with_a_reason(raw_stub, fraud_rows):
    import grpc

    rows = fraud_rows[0][:2]
    short_raw = _request(rows)
    short_raw.raw_input_contents[0] = short_raw.raw_input_contents[0][:-4]
    two_raw = _request(rows)
    two_raw.raw_input_contents.append(b"")
    duplicate = _request(rows)
    duplicate.inputs.add(name="features", datatype="FP32", shape=[2, 30])
    duplicate.raw_input_contents.append(rows.astype(np.float32).tobytes())
    few_values = _request(rows, raw=False)
    del few_values.inputs[0].contents.fp32_contents[-1]
    cases = [
        (short_raw, "input 'features': 236 raw bytes, expected 240 for shape [2, 30] FP32"),
        (two_raw, "2 raw_input_contents for 1 inputs"),
        (duplicate, "input 'features' is given twice"),
        (few_values, "input 'features': 59 values in contents, shape [2, 30] needs 60"),
        (_request(rows, datatype="FP33"), "input 'features': unknown datatype 'FP33'"),
        (_request(rows, shape=[2, -30]), "input 'features': shape [2, -30] has a negative dimension"),
        (_request(rows, outputs=["score"]), "unknown requested output(s) ['score']; model outputs: "
                                            "['label', 'probabilities']"),
        (_request(rows, raw=False, datatype="FP16"), "input 'features': datatype FP16 must be sent as "
                                                     "raw_input_contents"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            raw_stub.ModelInfer(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert err.value.details() == message
