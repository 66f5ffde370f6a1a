"""The sentiment service through the real Envoy gateway: REST and gRPC, accuracy, errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from sentiment.v1 import sentiment_pb2 as pb
from sentiment.v1 import sentiment_pb2_grpc as rpc

from tests.gateway.helpers import bearer, post, rpc_error
from tests.sentiment.conftest import TOLERANCE

pytestmark = pytest.mark.integration

LABELS = ["negative", "positive"]


def rest_probs(prediction: dict) -> list[float]:
    assert [p["label"] for p in prediction["probabilities"]] == LABELS
    return [p["probability"] for p in prediction["probabilities"]]


def test_rest_predict_and_batch_equal_the_served_variant(gateway, token, served):
    tok = token(tier="internal")
    text = "The concert was breathtaking and the crowd was fantastic."
    resp = post(gateway, "/api/v1/sentiment", {"text": text}, token=tok)
    assert resp.status == 200, resp.body
    prediction = resp.json()["prediction"]
    want = served([text])[0]
    np.testing.assert_allclose(rest_probs(prediction), want, atol=TOLERANCE)
    assert prediction["label"] == LABELS[int(np.argmax(want))] and prediction["model_name"] == "sentiment"

    texts = ["Never buying from this shop again.", "Solid laptop, great screen.", "It was okay I guess."]
    resp = post(gateway, "/api/v1/sentiment:batch", {"texts": texts}, token=tok)
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["model_version"] == "1"
    for result, w in zip(body["results"], served(texts), strict=True):
        np.testing.assert_allclose(rest_probs(result["prediction"]), w, atol=TOLERANCE)


def test_grpc_through_the_gateway_equals_the_served_variant(gateway_channel, token, served):
    stub = rpc.SentimentServiceStub(gateway_channel)
    md = bearer(token(tier="internal"))
    texts = ["Friendly staff and spotless rooms.", "The update wiped my settings, furious."]
    want = served(texts)
    prediction = stub.Predict(pb.PredictRequest(text=texts[0]), metadata=md, timeout=30).prediction
    np.testing.assert_allclose([p.probability for p in prediction.probabilities], want[0], atol=TOLERANCE)
    batch = stub.PredictBatch(pb.PredictBatchRequest(texts=texts), metadata=md, timeout=30)
    for result, w in zip(batch.results, want, strict=True):
        np.testing.assert_allclose([p.probability for p in result.prediction.probabilities], w, atol=TOLERANCE)
    streamed = list(stub.StreamPredict(iter([pb.PredictRequest(text=t) for t in texts]), metadata=md, timeout=30))
    for result, w in zip(streamed, want, strict=True):
        np.testing.assert_allclose([p.probability for p in result.prediction.probabilities], w, atol=TOLERANCE)


def test_held_out_accuracy_through_the_gateway_matches_the_build(gateway, token, held_out, sentiment_config,
                                                                  served_variant):
    texts, labels = held_out
    tok = token(tier="internal")
    predicted: list[str] = []
    for i in range(0, len(texts), 32):
        resp = post(gateway, "/api/v1/sentiment:batch", {"texts": texts[i:i + 32]}, token=tok, timeout=60)
        assert resp.status == 200, resp.body
        predicted += [r["prediction"]["label"] for r in resp.json()["results"]]
    accuracy = float(np.mean([p == y for p, y in zip(predicted, labels, strict=True)]))
    recorded = sentiment_config["runtime"]["options"]["variants"][served_variant]["measured"]["accuracy"]
    fp32 = sentiment_config["parameters"]["metrics"]["held_out_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6)  # batch-invariant: served batches change nothing
    assert accuracy >= fp32 - 0.01 and accuracy >= 0.85


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/api/v1/sentiment", {"text": ""}, "text: text is empty or only whitespace"),
    ("/api/v1/sentiment", {"text": " \n "}, "text: text is empty or only whitespace"),
    ("/api/v1/sentiment", {"text": "z" * 4100}, "text: text has 4100 characters, at most 4096 are allowed"),
    ("/api/v1/sentiment:batch", {"texts": []}, "texts: empty batch, at least one item is required"),
    ("/api/v1/sentiment:batch", {"texts": ["fine"] * 40}, "texts: 40 items, at most 32 per batch"),
])
def test_rest_bad_input_is_400_naming_the_problem(gateway, token, path, body, message):
    resp = post(gateway, path, body, token=token(tier="internal"))
    assert resp.status == 400, resp.body
    assert resp.json()["message"] == message


def test_rest_one_bad_text_does_not_fail_the_batch(gateway, token):
    resp = post(gateway, "/api/v1/sentiment:batch", {"texts": ["Great!", "", "Bad."]}, token=token(tier="internal"))
    assert resp.status == 200, resp.body
    results = resp.json()["results"]
    assert "prediction" in results[0] and "prediction" in results[2]
    assert results[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert results[1]["error"]["message"] == "texts[1]: text is empty or only whitespace"


def test_grpc_bad_input_through_the_gateway_is_invalid_argument(gateway_channel, token):
    stub = rpc.SentimentServiceStub(gateway_channel)
    err = rpc_error(stub.Predict, pb.PredictRequest(text="   "), metadata=bearer(token(tier="internal")), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "text: text is empty or only whitespace"
