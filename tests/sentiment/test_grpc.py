"""sentiment.v1 over gRPC, straight to the service: answers equal the served runtime variant run in-process;
bad input is named."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from sentiment.v1 import sentiment_pb2 as pb

from tests.gateway.helpers import rpc_error
from tests.sentiment.conftest import TOLERANCE, long_text

pytestmark = pytest.mark.integration

TEXTS = [
    "Absolutely loved it, the staff were wonderful.",
    "Terrible. It broke after two days and support never answered.",
    "Not bad at all, actually.",
    "I wouldn't recommend this place to anyone.",
    "The pasta was fine.",
]


def probs_of(prediction: pb.SentimentPrediction) -> list[float]:
    assert [p.label for p in prediction.probabilities] == ["negative", "positive"]
    return [p.probability for p in prediction.probabilities]


def check(prediction: pb.SentimentPrediction, expected: np.ndarray) -> None:
    np.testing.assert_allclose(probs_of(prediction), expected, atol=TOLERANCE)
    best = int(np.argmax(expected))
    assert prediction.label == ["negative", "positive"][best]
    assert prediction.score == pytest.approx(expected[best], abs=TOLERANCE)
    assert prediction.model_name == "sentiment" and prediction.model_version == "1"


def test_predict_equals_the_served_variant(sentiment_stub, served):
    expected = served(TEXTS)
    for text, want in zip(TEXTS, expected, strict=True):
        prediction = sentiment_stub.Predict(pb.PredictRequest(text=text), timeout=30).prediction
        check(prediction, want)
        assert not prediction.truncated and 3 <= prediction.tokens < 30
    assert expected[:3].argmax(axis=1).tolist() == [1, 0, 1]  # clear cases, negation included


def test_predict_batch_equals_the_served_variant_and_keeps_order(sentiment_stub, served):
    texts = [*TEXTS, "Quick delivery, lovely packaging, five stars from me."]
    response = sentiment_stub.PredictBatch(pb.PredictBatchRequest(texts=texts), timeout=30)
    assert response.model_name == "sentiment" and response.model_version == "1"
    for result, want in zip(response.results, served(texts), strict=True):
        check(result.prediction, want)


def test_stream_predict_equals_the_served_variant_in_order(sentiment_stub, served):
    texts = [f"{t} (stream {i})" for i, t in enumerate(TEXTS * 3)]
    results = list(sentiment_stub.StreamPredict(iter([pb.PredictRequest(text=t) for t in texts]), timeout=60))
    assert len(results) == len(texts)
    for result, want in zip(results, served(texts), strict=True):
        check(result.prediction, want)


def test_over_long_text_is_truncated_and_says_so(sentiment_stub, served):
    text = long_text(200)
    prediction = sentiment_stub.Predict(pb.PredictRequest(text=text), timeout=30).prediction
    assert prediction.truncated and prediction.tokens == 128
    check(prediction, served([text])[0])  # the reference truncates the same way


@pytest.mark.parametrize(("text", "message"), [
    ("", "text: text is empty or only whitespace"),
    ("  \t\n ", "text: text is empty or only whitespace"),
    ("x" * 4097, "text: text has 4097 characters, at most 4096 are allowed"),
])
def test_bad_text_is_invalid_argument_naming_the_problem(sentiment_stub, text, message):
    err = rpc_error(sentiment_stub.Predict, pb.PredictRequest(text=text), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == message


def test_empty_and_oversized_batches_are_invalid_argument(sentiment_stub):
    err = rpc_error(sentiment_stub.PredictBatch, pb.PredictBatchRequest(texts=[]), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "texts: empty batch, at least one item is required"
    err = rpc_error(sentiment_stub.PredictBatch, pb.PredictBatchRequest(texts=["ok"] * 33), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "texts: 33 items, at most 32 per batch"


def test_one_bad_text_does_not_fail_the_batch(sentiment_stub, served):
    texts = ["Lovely little cafe with great coffee.", "   ", "Dreadful service, cold food.", "y" * 5000]
    response = sentiment_stub.PredictBatch(pb.PredictBatchRequest(texts=texts), timeout=30)
    kinds = [r.WhichOneof("outcome") for r in response.results]
    assert kinds == ["prediction", "error", "prediction", "error"]
    assert response.results[1].error.index == 1 and response.results[1].error.code == "INVALID_ARGUMENT"
    assert response.results[1].error.message == "texts[1]: text is empty or only whitespace"
    assert response.results[3].error.message == "texts[3]: text has 5000 characters, at most 4096 are allowed"
    want = served([texts[0], texts[2]])
    check(response.results[0].prediction, want[0])
    check(response.results[2].prediction, want[1])


def test_bad_message_in_a_stream_gets_its_own_error(sentiment_stub):
    requests = [pb.PredictRequest(text="Great value."), pb.PredictRequest(text=""),
                pb.PredictRequest(text="Awful.")]
    results = list(sentiment_stub.StreamPredict(iter(requests), timeout=30))
    assert [r.WhichOneof("outcome") for r in results] == ["prediction", "error", "prediction"]
    assert results[1].error.index == 1 and results[1].error.message == "text: text is empty or only whitespace"


def test_unknown_model_version_is_not_found(sentiment_stub):
    err = rpc_error(sentiment_stub.Predict, pb.PredictRequest(text="fine", model_version="7"), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND
