"""fraud.v1 over real gRPC: parity with ONNX Runtime, batching, streaming, cache, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from fraud.v1 import fraud_pb2 as pb

from tests.fraud.helpers import perturb, predict_request, stub, tx
from tests.support.procs import RedisServer, ServiceProcess

pytestmark = pytest.mark.integration
TOL = 1e-6


def test_unary_matches_onnx_runtime(fraud_service, fraud_rows, onnx_reference):
    x, _ = fraud_rows
    rows = perturb(x[:40], seed=1)
    expected = onnx_reference(rows)
    channel, client = stub(fraud_service.target)
    with channel:
        got = [client.Predict(predict_request(r, f"t{i}"), timeout=10).prediction for i, r in enumerate(rows)]
    np.testing.assert_allclose([p.fraud_probability for p in got], expected, atol=TOL)
    first = got[0]
    assert [p.transaction_id for p in got] == [f"t{i}" for i in range(40)]
    assert first.model_name == "fraud" and first.model_version == "1"
    assert 0 < first.threshold < 1
    assert all(p.is_fraud == (p.fraud_probability >= p.threshold) for p in got)
    assert not any(p.cached or p.fallback for p in got)


def test_model_separates_fraud_from_legit(fraud_service, fraud_rows):
    """Served scores rank the fresh data's fraud rows above its legit ones (AUC well above chance)."""
    from sklearn.metrics import roc_auc_score

    x, y = fraud_rows
    rows = perturb(x[:1000], seed=2)
    channel, client = stub(fraud_service.target)
    with channel:
        results = []
        for start in range(0, len(rows), 250):
            resp = client.PredictBatch(pb.PredictBatchRequest(transactions=[tx(r) for r in rows[start:start + 250]]),
                                       timeout=10)
            results += [r.prediction.fraud_probability for r in resp.results]
    assert y[:1000].sum() >= 5
    assert roc_auc_score(y[:1000], results) > 0.9


def test_batch_matches_onnx_and_reports_per_item_errors(fraud_service, fraud_rows, onnx_reference):
    x, _ = fraud_rows
    rows = perturb(x[:20], seed=3)
    bad_nan = rows[0].copy()
    bad_nan[4] = np.nan
    bad_range = rows[0].copy()
    bad_range[1] = 24  # hour_of_day
    txs = [tx(r, f"ok{i}") for i, r in enumerate(rows[:10])]
    txs.insert(3, tx(bad_nan, "nan"))
    txs.insert(7, tx(rows[0][:29], "short"))
    txs.append(tx(bad_range, "range"))
    txs += [tx(r, f"ok{i}") for i, r in enumerate(rows[10:], start=10)]
    channel, client = stub(fraud_service.target)
    with channel:
        resp = client.PredictBatch(pb.PredictBatchRequest(transactions=txs), timeout=10)
    assert len(resp.results) == len(txs) == 23
    errors = {r.error.index: r.error for r in resp.results if r.WhichOneof("outcome") == "error"}
    assert sorted(errors) == [3, 7, 12]
    assert errors[3].code == "INVALID_ARGUMENT"
    assert "transactions[3].features[4] (distance_from_home_km)" in errors[3].message and "finite" in errors[3].message
    assert errors[7].message == "transactions[7].features: expected 30 values, got 29"
    assert errors[12].message == "transactions[12].features[1] (hour_of_day) = 24 is outside [0, 23]"
    preds = [r.prediction for r in resp.results if r.WhichOneof("outcome") == "prediction"]
    assert [p.transaction_id for p in preds] == [f"ok{i}" for i in range(20)]
    np.testing.assert_allclose([p.fraud_probability for p in preds], onnx_reference(rows), atol=TOL)
    assert resp.model_name == "fraud" and resp.model_version == "1"


def test_stream_matches_onnx_in_order_and_survives_bad_messages(fraud_service, fraud_rows, onnx_reference):
    x, _ = fraud_rows
    rows = perturb(x[:50], seed=4)
    requests = [predict_request(r, f"s{i}") for i, r in enumerate(rows)]
    requests.insert(10, predict_request([1.0, 2.0], "bad"))
    requests.insert(20, predict_request(rows[0], "wrong-version", version="7"))
    channel, client = stub(fraud_service.target)
    with channel:
        results = list(client.StreamPredict(iter(requests), timeout=20))
    assert len(results) == 52
    assert results[10].error.index == 10 and results[10].error.code == "INVALID_ARGUMENT"
    assert results[10].error.message == "transaction.features: expected 30 values, got 2"
    assert results[20].error.code == "NOT_FOUND" and "no version '7'" in results[20].error.message
    preds = [r.prediction for i, r in enumerate(results) if i not in (10, 20)]
    assert [p.transaction_id for p in preds] == [f"s{i}" for i in range(50)]
    np.testing.assert_allclose([p.fraud_probability for p in preds], onnx_reference(rows), atol=TOL)


def test_repeated_input_hits_the_cache_with_identical_answer(fraud_service, fraud_rows):
    row = perturb(fraud_rows[0][100:101], seed=5)[0]
    channel, client = stub(fraud_service.target)
    with channel:
        first = client.Predict(predict_request(row, "a"), timeout=10).prediction
        second = client.Predict(predict_request(row, "b"), timeout=10).prediction
        in_batch = client.PredictBatch(pb.PredictBatchRequest(transactions=[tx(row), tx(perturb(row[None], 9)[0])]),
                                       timeout=10)
    assert not first.cached and second.cached
    assert second.fraud_probability == first.fraud_probability
    assert second.is_fraud == first.is_fraud and second.transaction_id == "b"
    assert [r.prediction.cached for r in in_batch.results] == [True, False]
    assert in_batch.results[0].prediction.fraud_probability == first.fraud_probability


def test_bad_inputs_get_specific_errors(fraud_service, fraud_rows):
    row = fraud_rows[0][0]
    inf_row = row.copy()
    inf_row[0] = np.inf
    neg = row.copy()
    neg[0] = -5
    cases = [
        (predict_request([]), grpc.StatusCode.INVALID_ARGUMENT, "transaction.features: expected 30 values, got 0"),
        (predict_request([*row.tolist(), 1.0]), grpc.StatusCode.INVALID_ARGUMENT,
         "transaction.features: expected 30 values, got 31"),
        (predict_request(inf_row), grpc.StatusCode.INVALID_ARGUMENT,
         "transaction.features[0] (amount) is inf, not a finite number"),
        (predict_request(neg), grpc.StatusCode.INVALID_ARGUMENT,
         "transaction.features[0] (amount) = -5 is outside [0, 1e+06]"),
        (predict_request(row, version="2"), grpc.StatusCode.NOT_FOUND,
         "model_version: fraud has no version '2' served; served version: 1"),
    ]
    channel, client = stub(fraud_service.target)
    with channel:
        for request, code, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                client.Predict(request, timeout=10)
            assert err.value.code() == code
            assert err.value.details() == message
        with pytest.raises(grpc.RpcError) as err:
            client.PredictBatch(pb.PredictBatchRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "transactions: empty batch, at least one item is required"
        with pytest.raises(grpc.RpcError) as err:
            client.PredictBatch(pb.PredictBatchRequest(transactions=[tx(row)] * 257), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "transactions: 257 items, at most 256 per batch"
        # the service is unharmed
        assert client.Predict(predict_request(row), timeout=10).prediction.model_version == "1"


def test_concurrent_calls_are_batched(fraud_service, fraud_rows, onnx_reference):
    """Concurrent unary calls from many clients share batches (batch-size histogram moves past 1)."""
    import urllib.request

    def batches_over_one() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{fraud_service.metrics_port}/metrics", timeout=5).read()
        total = le1 = 0.0
        for line in text.decode().splitlines():
            if line.startswith("inference_batch_size_count{"):
                total = float(line.rsplit(" ", 1)[1])
            if line.startswith('inference_batch_size_bucket{le="1.0"'):
                le1 = float(line.rsplit(" ", 1)[1])
        return total - le1

    before = batches_over_one()
    channel, client = stub(fraud_service.target)
    with channel:
        # Whether a burst coalesces depends on how fast the client sends on a busy 2-core machine; a batcher
        # that never batches fails all three bursts.
        for burst in range(3):
            rows = perturb(fraud_rows[0][200:456], seed=6 + burst)
            futures = [client.Predict.future(predict_request(r), timeout=20) for r in rows]
            probs = [f.result().prediction.fraud_probability for f in futures]
            np.testing.assert_allclose(probs, onnx_reference(rows), atol=TOL)
            if batches_over_one() > before:
                break
    assert batches_over_one() > before


def test_new_version_never_gets_old_versions_cached_answer(model_repository, fraud_rows, tmp_path: Path):
    """v1 and v2 share one Redis; v2 must miss on rows v1 cached, and answer with its own model."""
    from fraud_service.build_model import build

    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "fraud" / "1", repo / "fraud" / "1")
    redis = RedisServer().start()
    rows = perturb(fraud_rows[0][500:510], seed=7)

    def serve_twice() -> tuple[list, list]:
        """Start the newest version against the shared Redis, send every row twice, stop it."""
        svc = ServiceProcess("fraud_service", "FRAUD_", env={
            "FRAUD_MODEL_REPOSITORY": str(repo), "REDIS_URL": redis.url}).start()
        channel, client = stub(svc.target)
        with channel:
            answers = [[client.Predict(predict_request(r), timeout=10).prediction for r in rows] for _ in range(2)]
        svc.stop()
        return answers[0], answers[1]

    try:
        first, again = serve_twice()
        assert all(p.cached for p in again) and not any(p.cached for p in first)
        build(repo, version=2, seed=7, rows=60_000)  # another seed: another model
        fresh, repeat = serve_twice()
    finally:
        redis.stop()
    assert {p.model_version for p in fresh} == {"2"}
    assert not any(p.cached for p in fresh)
    assert all(p.cached for p in repeat)
    assert [p.fraud_probability for p in fresh] != [p.fraud_probability for p in first]


def test_redis_stopped_mid_test_requests_still_succeed(model_repository, fraud_rows, onnx_reference):
    redis = RedisServer().start()
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "REDIS_URL": redis.url,
        "FRAUD_BREAKER_RESET_S": "1", "FRAUD_REDIS_TIMEOUT_MS": "50"}).start()
    rows = perturb(fraud_rows[0][600:640], seed=8)
    try:
        channel, client = stub(svc.target)
        with channel:
            warm = [client.Predict(predict_request(r), timeout=10).prediction for r in rows[:10]]
            assert not any(p.cached for p in warm)
            redis.stop()
            during = [client.Predict(predict_request(r), timeout=10).prediction for r in rows]
            assert not any(p.cached for p in during)  # the cache is bypassed, not consulted
            np.testing.assert_allclose([p.fraud_probability for p in during], onnx_reference(rows), atol=TOL)
            metrics = _scrape(svc.metrics_port)
            assert 'inference_circuit_breaker_state{breaker="redis"} 2.0' in metrics
    finally:
        svc.stop()
        redis.stop()


def _scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
