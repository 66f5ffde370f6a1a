"""Open Inference Protocol v2 with tritonclient and a BYTES tensor of texts, against the sentiment service."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from sentiment.v1 import sentiment_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.support.metrics import scrape

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(sentiment_service):
    c = tc.InferenceServerClient(sentiment_service.target)
    yield c
    c.close()


def _texts(texts: list[str]) -> tc.InferInput:
    arr = np.array([t.encode() for t in texts], dtype=object)
    inp = tc.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def test_metadata_declares_a_bytes_text_input(client, served_variant, sentiment_config):
    meta = client.get_model_metadata("sentiment", as_json=True)
    backend = sentiment_config["runtime"]["options"]["variants"][served_variant]["backend"]
    assert meta["platform"] == {"torchscript": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}[backend]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "probabilities": "FP32", "label": "INT64", "truncated": "BOOL", "tokens": "INT32"}


def test_bytes_inference_agrees_with_the_typed_api(client, sentiment_stub):
    texts = ["An utterly charming film.", "The battery died in an hour, useless.", "Not bad at all.",
             "word " * 300]
    result = client.infer("sentiment", [_texts(texts)])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (4, 2) and probs.dtype == np.float32
    typed = sentiment_stub.PredictBatch(pb.PredictBatchRequest(texts=texts), timeout=30).results
    np.testing.assert_allclose(probs, [[p.probability for p in r.prediction.probabilities] for r in typed],
                               atol=1e-6)
    assert result.as_numpy("label").tolist() == [["negative", "positive"].index(r.prediction.label) for r in typed]
    assert result.as_numpy("truncated").tolist() == [False, False, False, True]
    assert result.as_numpy("tokens").tolist() == [r.prediction.tokens for r in typed]


def test_wrong_datatype_for_the_text_input_is_invalid_argument(client):
    inp = tc.InferInput("text", [2], "FP32")
    inp.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sentiment", [inp])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'text': datatype must be BYTES" in exc.value.message()


def test_empty_text_in_a_bytes_tensor_is_invalid_argument(client):
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sentiment", [_texts(["fine", "  "])])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "row 1: text is empty or only whitespace" in exc.value.message()


def test_the_served_variant_is_visible_in_model_config_and_metrics(client, sentiment_service, served_variant,
                                                                   sentiment_config):
    """The variant chosen at load: ModelConfig's default_model_filename and instance kind, and a gauge."""
    variant = sentiment_config["runtime"]["options"]["variants"][served_variant]
    config = client.get_model_config("sentiment", as_json=True)["config"]
    assert config["default_model_filename"] == variant["artifact"]
    assert config["instance_group"][0]["kind"] == ("KIND_GPU" if variant["target"] == "gpu" else "KIND_CPU")
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["runtime_variant"] == served_variant and params["runtime_variant_selection"] == "auto"
    assert params["runtime_variant_reason"]  # why it was chosen, as logged
    samples = scrape(sentiment_service.metrics_port)
    served = {dict(labels)["variant"]: (value, dict(labels)) for (name, labels), value in samples.items()
              if name == "inference_model_variant" and dict(labels)["model"] == "sentiment"}
    assert list(served) == [served_variant]
    value, labels = served[served_variant]
    assert value == 1 and labels["selection"] == "auto" and labels["backend"] == variant["backend"]
