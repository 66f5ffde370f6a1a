"""The typed cnn.v1 API over real gRPC: answers agree with the ONNX model run directly; bad input is named."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from cnn.v1 import cnn_pb2 as pb
from google.protobuf import json_format

from cnn_service.images import ImageLimits, decode_image
from tests.cnn.helpers import BAD_BATCH, BAD_PREDICT, encode, png_claiming, tensor, top_labels

pytestmark = pytest.mark.integration

LIMITS = ImageLimits(height=32, width=32, max_image_bytes=1 << 20, max_image_pixels=4096 * 4096)


def _probs_by_class(c: pb.Classification) -> np.ndarray:
    out = np.full(10, np.nan, dtype=np.float32)
    for score in c.classes:
        out[score.class_index] = score.probability
    return out


def _check(c: pb.Classification, reference: np.ndarray, k: int) -> None:
    """`c` holds the k most probable classes of `reference` (probabilities [10]), most probable first."""
    order = np.argsort(-reference, kind="stable")[:k]
    assert [s.class_index for s in c.classes] == order.tolist()
    assert top_labels(c) == [str(i) for i in order]
    np.testing.assert_allclose([s.probability for s in c.classes], reference[order], rtol=1e-5, atol=1e-6)
    assert c.model_name == "cnn" and c.model_version == "1" and not c.cached


def test_predict_agrees_with_onnx_for_every_input_form(cnn_stub, heldout, onnx_probabilities):
    images, labels = heldout
    pixels = images[:6]
    reference = onnx_probabilities(pixels)
    for i, px in enumerate(pixels):
        for item in ({"image": encode(px, "PNG")}, {"image": encode(px, "BMP")},
                     {"tensor": tensor(px)}, {"tensor": tensor(px, "FP32", shape=[1, 32, 32])},
                     {"tensor": tensor(px, as_floats=True)}):
            resp = cnn_stub.Predict(pb.PredictRequest(id=f"img-{i}", top_k=3, **item), timeout=10)
            assert resp.classification.id == f"img-{i}"
            _check(resp.classification, reference[i], 3)
        assert resp.classification.classes[0].label == str(labels[i])


def test_resized_colour_jpeg_agrees_with_onnx_on_the_same_preprocessing(cnn_stub, heldout, onnx_probabilities):
    images, _ = heldout
    for px in images[10:14]:
        data = encode(px, "JPEG", mode="RGB", size=(90, 90))
        reference = onnx_probabilities(decode_image(data, LIMITS)[None])[0]
        resp = cnn_stub.Predict(pb.PredictRequest(image=data, top_k=10), timeout=10)
        _check(resp.classification, reference, 10)
        assert sum(s.probability for s in resp.classification.classes) == pytest.approx(1.0, abs=1e-5)


def test_default_top_k_comes_from_the_config(cnn_stub, heldout, cnn_config):
    resp = cnn_stub.Predict(pb.PredictRequest(tensor=tensor(heldout[0][20])), timeout=10)
    assert len(resp.classification.classes) == cnn_config["parameters"]["default_top_k"] == 3


def test_predict_batch_agrees_and_isolates_bad_items(cnn_stub, heldout, onnx_probabilities):
    images, _ = heldout
    pixels = images[30:60]
    reference = onnx_probabilities(pixels)
    inputs = [pb.ImageInput(id=str(i), image=encode(px)) if i % 2 else pb.ImageInput(id=str(i), tensor=tensor(px))
              for i, px in enumerate(pixels)]
    inputs.insert(3, pb.ImageInput(id="bad-bytes", image=b"GIF89a not accepted"))
    inputs.insert(7, pb.ImageInput(id="bomb", image=png_claiming(100_000, 100_000)))
    resp = cnn_stub.PredictBatch(pb.PredictBatchRequest(inputs=inputs, top_k=2), timeout=10)
    assert resp.model_name == "cnn" and resp.model_version == "1" and len(resp.results) == 32
    assert resp.results[3].WhichOneof("outcome") == "error"
    assert resp.results[3].error.index == 3 and resp.results[3].error.code == "INVALID_ARGUMENT"
    assert resp.results[3].error.message.startswith("inputs[3].image: 19 bytes that are not a decodable")
    assert resp.results[7].error.message.startswith("inputs[7].image: 100000x100000")
    good = [r for j, r in enumerate(resp.results) if j not in (3, 7)]
    for i, result in enumerate(good):
        assert result.classification.id == str(i)
        _check(result.classification, reference[i], 2)


def test_stream_answers_in_order_and_a_bad_message_does_not_end_it(cnn_stub, heldout, onnx_probabilities):
    images, _ = heldout
    pixels = images[60:80]
    reference = onnx_probabilities(pixels)
    requests = [pb.PredictRequest(id=str(i), tensor=tensor(px), top_k=1) for i, px in enumerate(pixels)]
    requests.insert(5, pb.PredictRequest(id="bad", tensor=tensor(pixels[0], shape=[32, 32, 1])))
    requests.insert(9, pb.PredictRequest(id="bad-k", image=encode(pixels[0]), top_k=99))
    results = list(cnn_stub.StreamPredict(iter(requests), timeout=20))
    assert len(results) == 22
    assert results[5].error.index == 5 and results[5].error.message.startswith("tensor.shape: [32, 32, 1]")
    assert results[9].error.index == 9 and results[9].error.message.startswith("top_k: 99 is out of range")
    good = [r for j, r in enumerate(results) if j not in (5, 9)]
    for i, result in enumerate(good):
        assert result.classification.id == str(i)
        _check(result.classification, reference[i], 1)


def test_model_version(cnn_stub, heldout):
    px = heldout[0][0]
    assert cnn_stub.Predict(pb.PredictRequest(tensor=tensor(px), model_version="1"), timeout=10).classification
    with pytest.raises(grpc.RpcError) as err:
        cnn_stub.Predict(pb.PredictRequest(tensor=tensor(px), model_version="7"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no version '7'" in err.value.details()


@pytest.mark.parametrize(("case", "body", "message"), BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_bad_predict_input_is_invalid_argument_naming_the_field(cnn_stub, case, body, message):
    request = json_format.ParseDict(body, pb.PredictRequest())
    with pytest.raises(grpc.RpcError) as err:
        cnn_stub.Predict(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()


@pytest.mark.parametrize(("case", "body", "message"), BAD_BATCH, ids=[c[0] for c in BAD_BATCH])
def test_bad_batch_is_invalid_argument(cnn_stub, case, body, message):
    with pytest.raises(grpc.RpcError) as err:
        cnn_stub.PredictBatch(json_format.ParseDict(body, pb.PredictBatchRequest()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()


def test_every_bad_predict_input_is_also_an_item_error_in_a_batch(cnn_stub):
    items = [json_format.ParseDict({k: v for k, v in body.items() if k != "top_k"}, pb.ImageInput())
             for _, body, message in BAD_PREDICT if not message.startswith("top_k")]
    resp = cnn_stub.PredictBatch(pb.PredictBatchRequest(inputs=items), timeout=10)
    expected = [m for _, _, m in BAD_PREDICT if not m.startswith("top_k")]
    assert len(resp.results) == len(expected)
    for i, (result, message) in enumerate(zip(resp.results, expected, strict=True)):
        assert result.error.index == i and result.error.code == "INVALID_ARGUMENT"
        field, reason = message.split(": ", 1)
        assert result.error.message.startswith(f"inputs[{i}].{field}: {reason}"), result.error.message
