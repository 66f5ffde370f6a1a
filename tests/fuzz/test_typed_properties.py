"""Property tests of the typed gRPC APIs (fraud.v1, cnn.v1, sentiment.v1) over real gRPC: any item -- features
that are too few, too many, NaN, infinite or out of range, huge ids, odd card fields, garbage or truncated image
bytes, pixel tensors of the wrong shape, datatype, length or values, empty, whitespace-only, over-long or
unicode-garbage texts, unknown versions -- gets OK with the reference answer when it is valid, else a client
error naming its field (`transaction.features`, `inputs[3].tensor.shape`, `texts[2]`, `model_version`); never
INTERNAL, UNKNOWN or a hang. In a batch or a stream a bad item gets its own error and never harms the others.

Bounded by the Hypothesis profile (tests/fuzz/conftest.py): `ci` in `make test`, `long` in `make chaos`.
"""

from __future__ import annotations

import itertools
import time

import grpc
import numpy as np
import pytest
from cnn.v1 import cnn_pb2, cnn_pb2_grpc
from fraud.v1 import fraud_pb2, fraud_pb2_grpc
from hypothesis import event, given, note
from hypothesis import strategies as st
from sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc

from tests.fraud.helpers import perturb
from tests.fuzz.strategies import (
    CLIENT_ERRORS,
    card_transaction_valid,
    cnn_inputs,
    fraud_features_valid,
    fraud_transactions,
    fuzz_settings,
    mostly,
    text_valid,
    texts,
    versions,
)

pytestmark = pytest.mark.integration

TIMEOUT_S = 30
SERVED = ("", "0", "1")
_seeds = itertools.count(5000)


def outcome(future_or_call) -> tuple[grpc.StatusCode, str, object]:
    """(status, message, response) of a unary call's future."""
    try:
        return grpc.StatusCode.OK, "", future_or_call.result()
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


def retry_busy(call, request):
    """A call that must succeed; admission control may refuse it on a busy machine: retry then."""
    for _ in range(5):
        code, message, response = outcome(call.future(request, timeout=TIMEOUT_S))
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            break
    assert code == grpc.StatusCode.OK, (code, message)
    return response


def check_refusal(code: grpc.StatusCode, message: str, expected: grpc.StatusCode, field: str) -> None:
    """A refusal is a documented client error whose message names `field`."""
    assert code in CLIENT_ERRORS, f"{code}: {message}"
    assert message.strip(), "an error must say why"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # admission control on a busy machine
        return
    assert code == expected, f"expected {expected}, got {code}: {message}"
    assert field in message, f"the message does not name {field!r}: {message!r}"


def check_item_error(error, index: int, expected: grpc.StatusCode, field: str) -> None:
    """A batch or stream item's error: its index, a client-error code name and a message naming its field."""
    assert error.index == index
    check_refusal(grpc.StatusCode[error.code], error.message, expected, field)


# -- fraud.v1 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fraud(fraud_channel) -> fraud_pb2_grpc.FraudServiceStub:
    return fraud_pb2_grpc.FraudServiceStub(fraud_channel)


@pytest.fixture(scope="module")
def rows(fraud_rows) -> np.ndarray:
    return perturb(fraud_rows[0][1000:1400], seed=78)


def fraud_expectation(tx, version: str, bounds) -> tuple[grpc.StatusCode, str]:
    """The status a fraud item must get (NOT_FOUND for an unknown version), and the field to name if refused."""
    if version not in SERVED:
        return grpc.StatusCode.NOT_FOUND, "model_version"
    if tx.card_id or not len(tx.features):
        if not len(tx.features) and card_transaction_valid(tx, time.time()):
            return grpc.StatusCode.OK, ""
        return grpc.StatusCode.INVALID_ARGUMENT, "transaction"
    if fraud_features_valid(list(tx.features), bounds):
        return grpc.StatusCode.OK, ""
    return grpc.StatusCode.INVALID_ARGUMENT, "transaction.features"


def check_fraud_prediction(p, tx, reference) -> None:
    """A prediction echoes the transaction, is the reference's probability (features) and is decided at the
    version's threshold."""
    assert p.transaction_id == tx.transaction_id and p.model_name == "fraud" and p.model_version == "1"
    assert 0.0 <= p.fraud_probability <= 1.0 and p.is_fraud == (p.fraud_probability >= p.threshold)
    assert not p.fallback
    if tx.card_id:
        assert p.card_id == tx.card_id and p.feature_source in ("store", "cold_start", "store_unavailable")
    else:
        assert p.feature_source == "request"
        expected = reference(np.asarray([tx.features], np.float32))[0]
        assert abs(p.fraud_probability - expected) <= 1e-6, (p.fraud_probability, expected)


def good_fraud(rows: np.ndarray) -> fraud_pb2.PredictRequest:
    """A valid request of a never-sent row (the cache cannot answer it)."""
    i = next(_seeds)
    row = perturb(rows[i % len(rows):i % len(rows) + 1], seed=i)[0]
    return fraud_pb2.PredictRequest(transaction=fraud_pb2.Transaction(transaction_id=f"good-{i}",
                                                                      features=row.tolist()))


@fuzz_settings(60)
@given(data=st.data())
def test_fraud_predict(fraud, rows, fraud_bounds, onnx_reference, data):
    tx = data.draw(fraud_transactions(rows, fraud_pb2), label="transaction")
    version = data.draw(versions, label="model_version")
    expected, field = fraud_expectation(tx, version, fraud_bounds)
    good = good_fraud(rows)
    future = fraud.Predict.future(fraud_pb2.PredictRequest(transaction=tx, model_version=version), timeout=TIMEOUT_S)
    good_future = fraud.Predict.future(good, timeout=TIMEOUT_S)  # the same batch window
    code, message, response = outcome(future)
    note(f"expected {expected}, got {code}: {message!r}")
    event(f"expected {expected.name}, got {code.name}")
    if expected == grpc.StatusCode.OK:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            response = retry_busy(fraud.Predict, fraud_pb2.PredictRequest(transaction=tx, model_version=version))
        else:
            assert code == grpc.StatusCode.OK, f"a valid transaction was refused: {code}: {message}"
        check_fraud_prediction(response.prediction, tx, onnx_reference)
    else:
        assert code != grpc.StatusCode.OK, "an invalid transaction was scored"
        check_refusal(code, message, expected, field)
    code, message, good_response = outcome(good_future)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        good_response = retry_busy(fraud.Predict, good)
    else:
        assert code == grpc.StatusCode.OK, (code, message)
    check_fraud_prediction(good_response.prediction, good.transaction, onnx_reference)


@fuzz_settings(30)
@given(data=st.data())
def test_fraud_batch_and_stream_answer_every_item(fraud, rows, fraud_bounds, onnx_reference, data):
    """PredictBatch and StreamPredict: one result per item, in order; a bad item's error names it by index and
    field, the good items (a fresh valid one among them) get their reference answers."""
    txs = data.draw(st.lists(fraud_transactions(rows, fraud_pb2), min_size=1, max_size=6), label="transactions")
    txs.insert(data.draw(st.integers(0, len(txs)), label="good at"), good_fraud(rows).transaction)
    version = data.draw(versions, label="model_version")
    code, message, response = outcome(fraud.PredictBatch.future(
        fraud_pb2.PredictBatchRequest(transactions=txs, model_version=version), timeout=TIMEOUT_S))
    note(f"batch: {code} {message!r}")
    if version not in SERVED:
        check_refusal(code, message, grpc.StatusCode.NOT_FOUND, "model_version")
    elif code == grpc.StatusCode.OK:
        assert len(response.results) == len(txs)
        for i, (tx, result) in enumerate(zip(txs, response.results, strict=True)):
            expected, field = fraud_expectation(tx, version, fraud_bounds)
            check_fraud_result(result, i, tx, expected, field.replace("transaction", f"transactions[{i}]"),
                               onnx_reference)
    else:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
    stream_versions = [data.draw(versions, label=f"stream version {i}") for i in range(len(txs))]
    requests = [fraud_pb2.PredictRequest(transaction=tx, model_version=v) for tx, v in zip(txs, stream_versions,
                                                                                           strict=True)]
    results = list(fraud.StreamPredict(iter(requests), timeout=TIMEOUT_S))
    assert len(results) == len(requests)
    for i, (req, result) in enumerate(zip(requests, results, strict=True)):
        expected, field = fraud_expectation(req.transaction, req.model_version, fraud_bounds)
        check_fraud_result(result, i, req.transaction, expected, field, onnx_reference)


def check_fraud_result(result, index: int, tx, expected: grpc.StatusCode, field: str, reference) -> None:
    which = result.WhichOneof("outcome")
    event(f"item expected {expected.name}, got {which}")
    if which == "prediction":
        assert expected == grpc.StatusCode.OK, f"item {index}: an invalid transaction was scored"
        check_fraud_prediction(result.prediction, tx, reference)
    else:
        if expected == grpc.StatusCode.OK:
            assert result.error.code == "RESOURCE_EXHAUSTED", f"item {index}: a valid one was refused: {result.error}"
        check_item_error(result.error, index, expected if expected != grpc.StatusCode.OK
                         else grpc.StatusCode.RESOURCE_EXHAUSTED, field)


# -- cnn.v1 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn(cnn_channel) -> cnn_pb2_grpc.CnnServiceStub:
    return cnn_pb2_grpc.CnnServiceStub(cnn_channel)


top_ks = mostly(st.sampled_from([0, 0, 1, 3, 10]), st.integers(-2**31, 2**31 - 1), 80)


def check_classification(c, case, top_k: int, reference) -> None:
    """The top_k classes (most probable first) with the reference's probabilities for the pixels the model saw."""
    expected = reference(case.pixels[np.newaxis])[0]
    k = top_k or 3
    assert c.id == case.item.id and c.model_name == "cnn" and c.model_version == "1" and len(c.classes) == k
    got = {s.class_index: s.probability for s in c.classes}
    assert [s.label for s in c.classes] == [str(s.class_index) for s in c.classes]
    for index, p in got.items():
        assert abs(p - expected[index]) <= 1e-5, (index, p, expected[index])
    top = sorted(expected, reverse=True)[:k]
    np.testing.assert_allclose(sorted(got.values(), reverse=True), top, atol=1e-5)


def cnn_expectation(case, top_k: int, version: str) -> tuple[grpc.StatusCode, str]:
    if version not in SERVED:
        return grpc.StatusCode.NOT_FOUND, "model_version"
    if not 0 <= top_k <= 10:
        return grpc.StatusCode.INVALID_ARGUMENT, "top_k"
    if case.must:
        return grpc.StatusCode.OK, ""
    which = case.item.WhichOneof("input")
    return grpc.StatusCode.INVALID_ARGUMENT, which or "input"


def check_cnn_answer(code, message, classification, case, top_k, expected, field, reference) -> None:
    event(f"expected {expected.name}, got {code.name}")
    if code == grpc.StatusCode.OK and (expected == grpc.StatusCode.OK or case.pixels is not None):
        check_classification(classification, case, top_k, reference)  # (a truncated file PIL still reads)
    elif expected == grpc.StatusCode.OK:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"a valid image was refused: {code}: {message}"
    else:
        assert code != grpc.StatusCode.OK, "an invalid image was classified"
        check_refusal(code, message, expected, field)


@fuzz_settings(50)
@given(data=st.data())
def test_cnn_predict_and_batch(cnn, cnn_reference, data):
    case = data.draw(cnn_inputs(cnn_pb2), label="image")
    top_k, version = data.draw(top_ks, label="top_k"), data.draw(versions, label="model_version")
    request = cnn_pb2.PredictRequest(id=case.item.id, top_k=top_k, model_version=version)
    if case.item.WhichOneof("input") == "tensor":
        request.tensor.CopyFrom(case.item.tensor)
    elif case.item.WhichOneof("input") == "image":
        request.image = case.item.image
    expected, field = cnn_expectation(case, top_k, version)
    code, message, response = outcome(cnn.Predict.future(request, timeout=TIMEOUT_S))
    note(f"Predict: expected {expected}, got {code}: {message!r}")
    check_cnn_answer(code, message, response and response.classification, case, top_k, expected, field,
                     cnn_reference)
    # The same image in a batch, next to a valid one: each gets its own answer.
    good = data.draw(cnn_inputs(cnn_pb2, kinds=("pixels", "png")), label="good image")
    code, message, response = outcome(cnn.PredictBatch.future(
        cnn_pb2.PredictBatchRequest(inputs=[case.item, good.item], top_k=top_k, model_version=version),
        timeout=TIMEOUT_S))
    note(f"PredictBatch: {code}: {message!r}")
    if expected in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) and field in ("model_version",
                                                                                                "top_k"):
        check_refusal(code, message, expected, field)
        return
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return
    assert code == grpc.StatusCode.OK, (code, message)
    bad, ok = response.results
    if bad.WhichOneof("outcome") == "classification":
        check_cnn_answer(grpc.StatusCode.OK, "", bad.classification, case, top_k, expected, field, cnn_reference)
    else:
        assert expected != grpc.StatusCode.OK or bad.error.code == "RESOURCE_EXHAUSTED", bad.error
        check_item_error(bad.error, 0, expected if expected != grpc.StatusCode.OK
                         else grpc.StatusCode.RESOURCE_EXHAUSTED, f"inputs[0].{field}")
    if ok.WhichOneof("outcome") == "error":
        assert ok.error.code == "RESOURCE_EXHAUSTED", ok.error
    else:
        check_classification(ok.classification, good, top_k, cnn_reference)


@fuzz_settings(10)
@given(data=st.data())
def test_cnn_stream_answers_every_message(cnn, cnn_reference, data):
    cases = data.draw(st.lists(cnn_inputs(cnn_pb2), min_size=1, max_size=6), label="images")
    requests = []
    for case in cases:
        request = cnn_pb2.PredictRequest(id=case.item.id)
        if case.item.WhichOneof("input") == "tensor":
            request.tensor.CopyFrom(case.item.tensor)
        elif case.item.WhichOneof("input") == "image":
            request.image = case.item.image
        requests.append(request)
    results = list(cnn.StreamPredict(iter(requests), timeout=TIMEOUT_S))
    assert len(results) == len(requests)
    for i, (case, result) in enumerate(zip(cases, results, strict=True)):
        expected, field = cnn_expectation(case, 0, "")
        if result.WhichOneof("outcome") == "classification":
            check_cnn_answer(grpc.StatusCode.OK, "", result.classification, case, 0, expected, field, cnn_reference)
        else:
            assert expected != grpc.StatusCode.OK or result.error.code == "RESOURCE_EXHAUSTED", result.error
            check_item_error(result.error, i, expected if expected != grpc.StatusCode.OK
                             else grpc.StatusCode.RESOURCE_EXHAUSTED, field)


# -- sentiment.v1 --------------------------------------------------------------------------

KNOWN_TEXT = "a wonderful, moving film with a great cast"


@pytest.fixture(scope="module")
def sentiment(sentiment_channel) -> sentiment_pb2_grpc.SentimentServiceStub:
    return sentiment_pb2_grpc.SentimentServiceStub(sentiment_channel)


@pytest.fixture(scope="module")
def known_answer(sentiment) -> sentiment_pb2.SentimentPrediction:
    """The answer to a known text before any fuzzing: every later answer to it must be the same."""
    return retry_busy(sentiment.Predict, sentiment_pb2.PredictRequest(text=KNOWN_TEXT)).prediction


def check_sentiment(p, known=None) -> None:
    """A well-formed answer: the most probable label with its score, probabilities summing to 1, a token count
    within the model's sequence length; equal to `known` when given."""
    probs = {c.label: c.probability for c in p.probabilities}
    assert list(probs) == ["negative", "positive"] and abs(sum(probs.values()) - 1) <= 1e-5
    assert p.label == max(probs, key=probs.get) and abs(p.score - probs[p.label]) <= 1e-6
    assert 2 <= p.tokens <= 128 and p.model_name == "sentiment" and p.model_version == "1"
    if known is not None:
        assert p.label == known.label and abs(p.score - known.score) <= 1e-4, (p, known)


@fuzz_settings(25)
@given(data=st.data())
def test_sentiment_texts(sentiment, known_answer, data):
    """Any texts in a batch (with a known one), then one by one and in a stream: valid ones are classified, the
    others refused naming the text, the known text's answer never changes."""
    batch = data.draw(st.lists(texts, min_size=1, max_size=4), label="texts")
    version = data.draw(versions, label="model_version")
    at = data.draw(st.integers(0, len(batch)), label="known at")
    items = [*batch[:at], KNOWN_TEXT, *batch[at:]]
    code, message, response = outcome(sentiment.PredictBatch.future(
        sentiment_pb2.PredictBatchRequest(texts=items, model_version=version), timeout=TIMEOUT_S))
    note(f"batch: {code}: {message!r}")
    if version not in SERVED:
        check_refusal(code, message, grpc.StatusCode.NOT_FOUND, "model_version")
    elif code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert code == grpc.StatusCode.OK, (code, message)
        for i, (text, result) in enumerate(zip(items, response.results, strict=True)):
            event(f"valid {text_valid(text)}, got {result.WhichOneof('outcome')}")
            if result.WhichOneof("outcome") == "prediction":
                assert text_valid(text), f"texts[{i}]: an invalid text was classified"
                check_sentiment(result.prediction, known_answer if text == KNOWN_TEXT else None)
            elif text_valid(text):
                assert result.error.code == "RESOURCE_EXHAUSTED", result.error
            else:
                check_item_error(result.error, i, grpc.StatusCode.INVALID_ARGUMENT, f"texts[{i}]")
    text = batch[0]
    event(f"text valid: {text_valid(text)}, {'long' if len(text) > 200 else 'short'}")
    code, message, response = outcome(sentiment.Predict.future(sentiment_pb2.PredictRequest(text=text),
                                                               timeout=TIMEOUT_S))
    note(f"Predict: {code}: {message!r}")
    if text_valid(text):
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, message)
        if code == grpc.StatusCode.OK:
            check_sentiment(response.prediction)
    else:
        check_refusal(code, message, grpc.StatusCode.INVALID_ARGUMENT, "text")
    results = list(sentiment.StreamPredict(iter([sentiment_pb2.PredictRequest(text=t) for t in items]),
                                           timeout=TIMEOUT_S))
    assert len(results) == len(items)
    for i, (text, result) in enumerate(zip(items, results, strict=True)):
        if result.WhichOneof("outcome") == "prediction":
            assert text_valid(text), f"message {i}: an invalid text was classified"
            check_sentiment(result.prediction, known_answer if text == KNOWN_TEXT else None)
        elif text_valid(text):
            assert result.error.code == "RESOURCE_EXHAUSTED", result.error
        else:
            check_item_error(result.error, i, grpc.StatusCode.INVALID_ARGUMENT, "text")


def test_typed_services_still_serve_afterwards(fraud, cnn, sentiment, rows, onnx_reference, known_answer):
    """After every malformed request above, each service answers a valid request right."""
    good = good_fraud(rows)
    check_fraud_prediction(retry_busy(fraud.Predict, good).prediction, good.transaction, onnx_reference)
    c = retry_busy(cnn.Predict, cnn_pb2.PredictRequest(tensor=cnn_pb2.PixelTensor(
        shape=[32, 32], datatype="UINT8", raw_contents=bytes(1024)))).classification
    assert len(c.classes) == 3
    check_sentiment(retry_busy(sentiment.Predict, sentiment_pb2.PredictRequest(text=KNOWN_TEXT)).prediction,
                    known_answer)
