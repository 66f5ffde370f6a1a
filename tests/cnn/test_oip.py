"""Open Inference Protocol v2 with tritonclient against the cnn service: same model, FP32 pixel input."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from cnn.v1 import cnn_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.cnn.helpers import tensor

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(cnn_service):
    c = tc.InferenceServerClient(cnn_service.target)
    yield c
    c.close()


def _input(pixels: np.ndarray, datatype: str = "FP32", name: str = "image") -> tc.InferInput:
    inp = tc.InferInput(name, list(pixels.shape), datatype)
    inp.set_data_from_numpy(pixels)
    return inp


def test_metadata_and_config(client):
    assert client.is_model_ready("cnn", "1")
    meta = client.get_model_metadata("cnn", as_json=True)
    assert meta["name"] == "cnn" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "32", "32"]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"logits": ["-1", "10"], "probabilities": ["-1", "10"]}
    config = client.get_model_config("cnn", as_json=True)["config"]
    assert config["max_batch_size"] == 32
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 20_000
    assert config["dynamic_batching"]["preferred_batch_size"] == [8, 16, 32]


def test_model_infer_agrees_with_the_typed_api_and_onnx(client, cnn_stub, heldout, onnx_probabilities):
    images, labels = heldout
    pixels = images[200:232].astype(np.float32)
    result = client.infer("cnn", [_input(pixels[:, None])], outputs=[tc.InferRequestedOutput("probabilities")])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (32, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, onnx_probabilities(pixels), rtol=1e-5, atol=1e-6)
    typed = cnn_stub.PredictBatch(pb.PredictBatchRequest(
        inputs=[pb.ImageInput(tensor=tensor(px)) for px in images[200:232]], top_k=10), timeout=10)
    for row, r in zip(probs, typed.results, strict=True):
        by_class = {s.class_index: s.probability for s in r.classification.classes}
        np.testing.assert_allclose([by_class[c] for c in range(10)], row, rtol=1e-5, atol=1e-6)
    assert (probs.argmax(1) == labels[200:232]).mean() > 0.9


@pytest.mark.parametrize(("pixels", "datatype", "message"), [
    (np.full((1, 1, 32, 32), 300, np.float32), "FP32", "image: value 300 at [0, 0] is outside [0, 255]"),
    (np.zeros((1, 32, 32), np.float32), "FP32", "shape [1, 32, 32] does not match [N, 1, 32, 32]"),
    (np.zeros((1, 1, 32, 32), np.uint8), "UINT8", "datatype must be FP32"),
    (np.zeros((33, 1, 32, 32), np.float32), "FP32", "batch of 33 rows is over the limit of 32"),
])
def test_bad_oip_input_is_invalid_argument(client, pixels, datatype, message):
    with pytest.raises(InferenceServerException) as err:
        client.infer("cnn", [_input(pixels, datatype)])
    assert "INVALID_ARGUMENT" in str(err.value.status()) and message in err.value.message()
