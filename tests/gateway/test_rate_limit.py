"""100 requests per minute per API key (the token's verified `sub`), per tier, REST and gRPC alike.

The bucket holds 100 tokens and refills continuously at 100 per 60 s (one every 0.6 s), so
a key that bursts gets exactly 100 plus whatever refilled while it was sending.
"""

from __future__ import annotations

import time

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc

from tests.gateway.helpers import bearer, post, rpc_error

pytestmark = pytest.mark.integration

LIMIT = 100
REFILL_S = 60 / LIMIT


def burst_until_limited(gateway, token: str, body: dict, max_requests: int = 400, headers=None):
    """Send requests until the first 429; returns (successes, the 429 response, seconds taken)."""
    start = time.monotonic()
    for i in range(max_requests):
        resp = post(gateway, "/api/v1/fraud", body, token=token, headers=headers)
        if resp.status == 429:
            return i, resp, time.monotonic() - start
        assert resp.status == 200, resp.body
    raise AssertionError(f"no 429 after {max_requests} requests")


@pytest.fixture
def body(fraud_features) -> dict:
    return {"transaction": {"transaction_id": "rl", "features": fraud_features[0]}}


def test_key_gets_its_burst_then_429_while_another_key_is_unaffected(gateway, token, body):
    key_a, key_b = token("rate-a"), token("rate-b")
    first = post(gateway, "/api/v1/fraud", body, token=key_a)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit"] == str(LIMIT)
    assert first.headers["x-ratelimit-remaining"] == str(LIMIT - 1)

    ok, limited, took = burst_until_limited(gateway, key_a, body)
    emptied = time.monotonic()
    ok += 1  # the first request above
    assert LIMIT <= ok <= LIMIT + int(took / REFILL_S) + 1, (ok, took)
    assert limited.headers["x-ratelimit-limit"] == str(LIMIT)
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert int(limited.headers["x-ratelimit-reset"]) >= 0
    assert limited.json() == {
        "code": 8, "message": "rate limit exceeded for this API key; the x-ratelimit-* headers say when it refills"}

    other = post(gateway, "/api/v1/fraud", body, token=key_b)
    assert other.status == 200
    assert other.headers["x-ratelimit-remaining"] == str(LIMIT - 1)
    # A new token for the same key shares the key's bucket: empty, or holding only the tokens refilled since the
    # 429 (one per 0.6 s: a slow machine gets there), never a fresh bucket's LIMIT - 1.
    again = post(gateway, "/api/v1/fraud", body, token=token("rate-a"))
    refilled = int((time.monotonic() - emptied) / REFILL_S) + 1
    remaining = int(again.headers["x-ratelimit-remaining"])
    assert again.status == 429 or (again.status == 200 and remaining < refilled), (again.status, remaining, refilled)


def test_spoofed_key_header_does_not_move_the_bucket(gateway, token, body):
    """The client's own x-api-key header is dropped; only the verified claim counts."""
    victim, attacker = token("rate-victim"), token("rate-attacker")
    ok, _, _ = burst_until_limited(gateway, attacker, body, headers={"x-api-key": "rate-victim",
                                                                     "x-api-tier": "internal"})
    assert ok <= LIMIT + 10
    resp = post(gateway, "/api/v1/fraud", body, token=victim)
    assert resp.status == 200
    assert resp.headers["x-ratelimit-remaining"] == str(LIMIT - 1)


def test_grpc_gets_resource_exhausted_from_the_same_bucket(gateway, gateway_channel, token, body, fraud_features):
    key = token("rate-grpc")
    burst_until_limited(gateway, key, body)  # spend the bucket over REST
    stub = rpc.FraudServiceStub(gateway_channel)
    err = rpc_error(stub.Predict, pb.PredictRequest(transaction=pb.Transaction(features=fraud_features[0])),
                    metadata=bearer(key), timeout=5)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "rate limit exceeded for this API key; the x-ratelimit-* headers say when it refills"
    trailers = dict(err.trailing_metadata())
    assert trailers["x-ratelimit-limit"] == str(LIMIT) and trailers["x-ratelimit-remaining"] == "0"


def test_the_tier_claim_selects_a_bigger_bucket(gateway, token, body):
    resp = post(gateway, "/api/v1/fraud", body, token=token("rate-pro", tier="pro"))
    assert resp.status == 200
    assert resp.headers["x-ratelimit-limit"] == "1000"
    assert resp.headers["x-ratelimit-remaining"] == "999"


def test_an_unlisted_tier_shares_one_small_bucket(gateway, token, body):
    """A tier the gateway does not know gets no per-key bucket of its own: all such keys share one."""
    first = token("rate-gold-1", tier="gold")
    remaining = [int(post(gateway, "/api/v1/fraud", body, token=first).headers["x-ratelimit-remaining"])
                 for _ in range(3)]
    assert remaining[2] <= remaining[0] - 1
    other = post(gateway, "/api/v1/fraud", body, token=token("rate-gold-2", tier="gold"))
    assert other.status == 200 and other.headers["x-ratelimit-limit"] == str(LIMIT)
    # The second key continues the first one's count (own buckets would both start at 99).
    assert int(other.headers["x-ratelimit-remaining"]) <= remaining[2]


def test_per_method_limits_are_configuration(fraud_service, signing_key, fraud_features):
    """A per-method override (here PredictBatch at 3/min for standard keys) renders and applies."""
    from mlplatform_gateway import auth

    from tests.support.procs import GatewayProcess

    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path, overrides={
        "rate_limit": {"methods": {"fraud.v1.FraudService/PredictBatch": {"standard": 3}}}}).start()
    try:
        key = auth.mint_token(signing_key, "rate-method")
        batch = {"transactions": [{"transaction_id": "m", "features": fraud_features[0]}]}
        statuses = [post(gw, "/api/v1/fraud:batch", batch, token=key).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        single = post(gw, "/api/v1/fraud", {"transaction": batch["transactions"][0]}, token=key)
        assert single.status == 200 and single.headers["x-ratelimit-limit"] == str(LIMIT)
    finally:
        gw.stop()
