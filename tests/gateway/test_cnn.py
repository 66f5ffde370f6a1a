"""The cnn service through the real Envoy: held-out accuracy over REST and gRPC equals the build's, bad input
gets its specific 400 / INVALID_ARGUMENT, bidi stream and batches pass through."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from cnn.v1 import cnn_pb2 as pb
from cnn.v1 import cnn_pb2_grpc as rpc
from google.protobuf import json_format

from tests.cnn.helpers import BAD_BATCH, BAD_PREDICT, b64, encode, load_heldout, tensor
from tests.gateway.helpers import bearer, post, rpc_error

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def heldout(model_repository: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_heldout(model_repository)


@pytest.fixture(scope="module")
def recorded_correct(model_repository: Path) -> int:
    config = json.loads((model_repository / "cnn" / "1" / "config.json").read_text())
    return config["parameters"]["metrics"]["heldout_correct"]


@pytest.fixture
def stub(gateway_channel):
    return rpc.CnnServiceStub(gateway_channel)


def test_heldout_accuracy_over_rest_with_png_images_equals_the_build(gateway, token, heldout, recorded_correct):
    """Each held-out image as a lossless PNG (base64 in JSON), 32 per :batch call."""
    images, labels = heldout
    internal = token(tier="internal")
    predicted = []
    for start in range(0, len(labels), 32):
        body = {"inputs": [{"id": str(i), "image": b64(encode(images[i]))}
                           for i in range(start, min(start + 32, len(labels)))], "top_k": 1}
        resp = post(gateway, "/api/v1/cnn:batch", body, token=internal)
        assert resp.status == 200, resp.body
        results = resp.json()["results"]
        assert [r["classification"]["id"] for r in results] == [i["id"] for i in body["inputs"]]
        predicted += [int(r["classification"]["classes"][0]["label"]) for r in results]
    assert int((np.array(predicted) == labels).sum()) == recorded_correct


def test_heldout_accuracy_over_grpc_with_pixel_tensors_equals_the_build(stub, token, heldout, recorded_correct):
    images, labels = heldout
    metadata = bearer(token(tier="internal"))
    correct = 0
    for start in range(0, len(labels), 32):
        chunk = range(start, min(start + 32, len(labels)))
        resp = stub.PredictBatch(pb.PredictBatchRequest(inputs=[pb.ImageInput(tensor=tensor(images[i]))
                                                                for i in chunk], top_k=1),
                                 metadata=metadata, timeout=10)
        correct += sum(r.classification.classes[0].class_index == labels[i]
                       for i, r in zip(chunk, resp.results, strict=True))
    assert correct == recorded_correct


def test_rest_single_predict_matches_direct_grpc(gateway, cnn_service, token, heldout):
    px = heldout[0][42]
    resp = post(gateway, "/api/v1/cnn", {"id": "rest-1", "image": b64(encode(px, "BMP")), "top_k": 3},
                token=token())
    assert resp.status == 200, resp.body
    got = resp.json()["classification"]
    with grpc.insecure_channel(cnn_service.target) as channel:
        want = rpc.CnnServiceStub(channel).Predict(pb.PredictRequest(id="rest-1", image=encode(px, "BMP"), top_k=3))
    assert got["id"] == "rest-1" and (got["model_name"], got["model_version"]) == ("cnn", "1")
    assert [c["label"] for c in got["classes"]] == [c.label for c in want.classification.classes]
    assert [c["probability"] for c in got["classes"]] == pytest.approx(
        [c.probability for c in want.classification.classes], rel=1e-6)
    assert got["classes"][0]["label"] == str(heldout[1][42])


@pytest.mark.parametrize(("case", "body", "message"), BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_bad_input_over_rest_is_400_naming_the_field(gateway, token, case, body, message):
    resp = post(gateway, "/api/v1/cnn", body, token=token(tier="internal"))
    assert resp.status == 400, resp.body
    err = resp.json()
    assert err["code"] == 3 and err["message"].startswith(message), err


@pytest.mark.parametrize(("case", "body", "message"), BAD_BATCH, ids=[c[0] for c in BAD_BATCH])
def test_bad_batch_over_rest_is_400(gateway, token, case, body, message):
    resp = post(gateway, "/api/v1/cnn:batch", body, token=token(tier="internal"))
    assert resp.status == 400, resp.body
    assert resp.json()["code"] == 3 and resp.json()["message"].startswith(message), resp.json()


@pytest.mark.parametrize(("case", "body", "message"), BAD_PREDICT + BAD_BATCH,
                         ids=[c[0] for c in BAD_PREDICT + BAD_BATCH])
def test_bad_input_over_grpc_through_the_gateway(stub, token, case, body, message):
    if "inputs" in body:
        err = rpc_error(stub.PredictBatch, json_format.ParseDict(body, pb.PredictBatchRequest()),
                        metadata=bearer(token(tier="internal")), timeout=10)
    else:
        err = rpc_error(stub.Predict, json_format.ParseDict(body, pb.PredictRequest()),
                        metadata=bearer(token(tier="internal")), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(message), err.details()


def test_one_bad_image_in_a_rest_batch_does_not_fail_the_others(gateway, token, heldout):
    images, labels = heldout
    body = {"inputs": [{"image": b64(encode(images[0]))}, {"image": b64(b"garbage")},
                       {"tensor": {"shape": [32, 32], "datatype": "UINT8", "raw_contents": b64(images[1].tobytes())}}]}
    resp = post(gateway, "/api/v1/cnn:batch", body, token=token())
    assert resp.status == 200, resp.body
    results = resp.json()["results"]
    assert results[0]["classification"]["classes"][0]["label"] == str(labels[0])
    message = "inputs[1].image: 7 bytes that are not a decodable PNG, JPEG or BMP image"
    assert results[1]["error"] == {"index": 1, "code": "INVALID_ARGUMENT", "message": message}
    assert results[2]["classification"]["classes"][0]["label"] == str(labels[1])


def test_bidi_stream_through_the_gateway(stub, token, heldout):
    images, labels = heldout
    requests = [pb.PredictRequest(id=str(i), tensor=tensor(images[i]), top_k=1) for i in range(10)]
    results = list(stub.StreamPredict(iter(requests), metadata=bearer(token()), timeout=20))
    assert [r.classification.id for r in results] == [str(i) for i in range(10)]
    assert sum(r.classification.classes[0].label == str(labels[i]) for i, r in enumerate(results)) >= 9


def test_cnn_needs_a_token_like_every_route(gateway, heldout):
    resp = post(gateway, "/api/v1/cnn", {"image": b64(encode(heldout[0][0]))})
    assert resp.status == 401
