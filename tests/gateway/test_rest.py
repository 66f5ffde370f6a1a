"""REST through the real Envoy: transcoded calls agree with direct gRPC; bad requests get clear 4xx JSON."""

from __future__ import annotations

import json

import pytest
from fraud.v1 import fraud_pb2 as pb

from tests.gateway.helpers import http, post

pytestmark = pytest.mark.integration


def test_predict_matches_direct_grpc(gateway, direct, token, fraud_features):
    features = fraud_features[3]
    resp = post(gateway, "/api/v1/fraud", {"transaction": {"transaction_id": "rest-1", "features": features}},
                token=token())
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"] == "application/json"
    got = resp.json()["prediction"]
    want = direct.Predict(pb.PredictRequest(transaction=pb.Transaction(transaction_id="rest-1",
                                                                       features=features))).prediction
    assert got["transaction_id"] == "rest-1"
    assert got["fraud_probability"] == pytest.approx(want.fraud_probability, rel=1e-6)
    assert got["is_fraud"] is want.is_fraud
    assert got["threshold"] == pytest.approx(want.threshold)
    assert (got["model_name"], got["model_version"]) == ("fraud", "1")
    # Field names as in the proto, and defaults printed rather than omitted.
    assert set(got) >= {"fraud_probability", "is_fraud", "cached", "fallback"}


def test_batch_matches_direct_grpc_item_by_item(gateway, direct, token, fraud_features):
    rows = fraud_features[:6]
    bad = [1.0, 2.0]
    body = {"transactions": [{"transaction_id": f"b{i}", "features": f} for i, f in enumerate(rows)]
            + [{"transaction_id": "bad", "features": bad}]}
    resp = post(gateway, "/api/v1/fraud:batch", body, token=token())
    assert resp.status == 200, resp.body
    results = resp.json()["results"]
    want = direct.PredictBatch(pb.PredictBatchRequest(
        transactions=[pb.Transaction(transaction_id=f"b{i}", features=f) for i, f in enumerate(rows)]))
    assert len(results) == len(rows) + 1
    for got, expected in zip(results[:-1], want.results, strict=True):
        assert got["prediction"]["transaction_id"] == expected.prediction.transaction_id
        assert got["prediction"]["fraud_probability"] == pytest.approx(expected.prediction.fraud_probability,
                                                                       rel=1e-6)
    # The bad item has its own error; the others were scored.
    assert results[-1]["error"] == {"index": 6, "code": "INVALID_ARGUMENT",
                                    "message": "transactions[6].features: expected 30 values, got 2"}


@pytest.mark.parametrize(("body", "status", "code", "message"), [
    (b'{"transaction": {"features": [1, 2', 400, 3, "Unexpected end of string"),
    (b'{"transaction": {"features": "abc"}}', 400, 3, 'transaction.features: invalid value "abc" for type TYPE_FLOAT'),
    (b'{"transaction": {"features": [1, 2]}}', 400, 3, "transaction.features: expected 30 values, got 2"),
    # Unknown JSON fields are ignored (proto3 JSON); the missing required one is named.
    (b'{"transactionz": {}}', 400, 3, "transaction.features: expected 30 values, got 0"),
    (b'{"transaction": {"features": [1e400]}}', 400, 3, "Number exceeds the range of double"),
])
def test_bad_json_gets_400_with_a_json_error_naming_the_problem(gateway, token, body, status, code, message):
    resp = post(gateway, "/api/v1/fraud", body, token=token())
    assert resp.status == status, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()
    assert err["code"] == code
    assert message in err["message"]


def test_invalid_values_name_the_feature(gateway, token, fraud_features):
    features = list(fraud_features[0])
    features[0] = -5.0
    resp = post(gateway, "/api/v1/fraud", {"transaction": {"features": features}}, token=token())
    assert resp.status == 400
    err = resp.json()
    assert err["code"] == 3 and "amount" in err["message"] and "-5" in err["message"]


def test_empty_batch_is_invalid_argument(gateway, token):
    resp = post(gateway, "/api/v1/fraud:batch", {"transactions": []}, token=token())
    assert resp.status == 400
    assert resp.json()["code"] == 3 and "empty" in resp.json()["message"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/v1/nope"),
    ("POST", "/api/v2/fraud"),
    ("GET", "/api/v1/fraud"),
    ("DELETE", "/api/v1/fraud"),
    ("POST", "/admin"),
])
def test_unknown_path_or_verb_is_refused_by_the_gateway(gateway, token, method, path):
    resp = http(method, f"http://{gateway.target}{path}", b"{}", token=token())
    assert resp.status == 404, resp.body
    err = resp.json()
    assert err["code"] == 5
    if path == "/api/v1/nope":  # /api/v1/<model> is the config-only models' route: the generic service says
        assert err["message"] == "unknown model 'nope'; served: ['diabetes']"
    else:
        assert "Could not resolve" in err["message"] or "not found" in err["message"].lower()


def test_unknown_query_parameter_is_refused(gateway, token, fraud_features):
    resp = post(gateway, "/api/v1/fraud?debug=1", {"transaction": {"features": fraud_features[0]}}, token=token())
    assert resp.status in (400, 404)
    assert resp.json()["code"] in (3, 5)


def test_body_over_the_limit_gets_413_before_reaching_the_service(gateway, token, fraud_features):
    limit = 4 * 1024 * 1024
    row = {"transaction_id": "x" * 64, "features": fraud_features[0]}
    per_row = len(json.dumps(row)) + 2
    body = json.dumps({"transactions": [row] * (limit // per_row + 10)}).encode()
    assert len(body) > limit
    resp = post(gateway, "/api/v1/fraud:batch", body, token=token())
    assert resp.status == 413
    assert resp.json() == {"code": 3, "message": f"request body over the gateway's limit of {limit} bytes"}


def test_health_endpoint_is_open(gateway):
    resp = http("GET", f"http://{gateway.target}/healthz")
    assert resp.status == 200


def test_access_log_is_json_lines_with_the_verified_key(gateway, token, fraud_features):
    import time

    sub = "access-log-user"
    resp = post(gateway, "/api/v1/fraud", {"transaction": {"transaction_id": "log-1", "features": fraud_features[1]}},
                token=token(sub), headers={"x-api-key": "spoofed"})
    assert resp.status == 200
    deadline = time.monotonic() + 5  # Envoy flushes file access logs about once a second
    while time.monotonic() < deadline:
        entries = [e for e in gateway.access_log() if e.get("api_key") in (sub, "spoofed")]
        if entries:
            break
        time.sleep(0.1)
    assert entries, "no access log line for the request"
    entry = entries[0]
    assert entry["api_key"] == sub  # the verified claim, not the client's header
    assert len(entry["request_id"]) == 36
    assert entry["path"] == "/api/v1/fraud" and entry["grpc_method"] == "/fraud.v1.FraudService/Predict"
    assert entry["status"] == 200 and entry["upstream_cluster"] == "fraud"
    assert isinstance(entry["duration_ms"], int)


def test_grpc_status_maps_to_the_matching_http_status(gateway, token, fraud_features):
    """NOT_FOUND from the service (unknown model version) is a 404 with the service's message."""
    resp = post(gateway, "/api/v1/fraud", {"transaction": {"features": fraud_features[0]}, "model_version": "7"},
                token=token())
    assert resp.status == 404
    err = resp.json()
    assert err["code"] == 5 and "7" in err["message"]


def test_unknown_json_fields_are_dropped_and_the_answer_says_which_version_served(gateway, token, fraud_features):
    """proto3 JSON semantics (documented): a misspelt optional field is ignored, never silently obeyed."""
    resp = post(gateway, "/api/v1/fraud", {"transaction": {"features": fraud_features[0]}, "model_versoin": "2"},
                token=token())
    assert resp.status == 200
    assert resp.json()["prediction"]["model_version"] == "1"
