"""JWT authentication at the gateway: every way a token can be wrong, over REST and gRPC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import grpc
import jwt
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import auth

from tests.gateway.helpers import bearer, http, post, rpc_error

pytestmark = pytest.mark.integration


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, sign) -> str:
    """A compact JWS assembled by hand (for algorithms PyJWT refuses to produce)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"iss": auth.DEV_ISSUER, "aud": auth.DEV_AUDIENCE, "sub": "auth-user", "iat": now, "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def body(fraud_features) -> dict:
    return {"transaction": {"transaction_id": "auth", "features": fraud_features[0]}}


def tampered(token: str) -> str:
    """The token with its payload changed after signing (sub rewritten)."""
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"


def rs256(key: auth.SigningKey, payload: dict) -> str:
    return jwt.encode(payload, key.private_key, algorithm="RS256", headers={"kid": key.kid})


@pytest.fixture
def bad_tokens(signing_key, other_key) -> dict[str, str]:
    now = int(time.time())
    public_pem = signing_key.public_pem()
    return {
        "expired": rs256(signing_key, claims(iat=now - 7200, exp=now - 3600)),
        "no_exp": rs256(signing_key, claims(exp=None)),
        "wrong_audience": rs256(signing_key, claims(aud="someone-else")),
        "wrong_issuer": rs256(signing_key, claims(iss="https://evil.example.com/")),
        "other_key": rs256(other_key, claims()),
        "other_key_same_kid": jwt.encode(claims(), other_key.private_key, algorithm="RS256",
                                         headers={"kid": signing_key.kid}),
        "hs256_with_public_key": hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": signing_key.kid}, claims(),
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()),
        "alg_none": hand_made({"alg": "none", "typ": "JWT"}, claims(), lambda data: b""),
        "alg_none_with_signature": hand_made({"alg": "none", "typ": "JWT"}, claims(), lambda data: b"x" * 32),
        "lifetime_over_max": rs256(signing_key, claims(exp=now + 3 * 86400)),
        "not_yet_valid": rs256(signing_key, claims(nbf=now + 3600)),
        "garbage": "not-a-jwt",
        "tampered": tampered(rs256(signing_key, claims())),
    }


def test_valid_token_is_accepted(gateway, token, body):
    resp = post(gateway, "/api/v1/fraud", body, token=token())
    assert resp.status == 200
    assert resp.json()["prediction"]["transaction_id"] == "auth"


def test_missing_token_is_401(gateway, body):
    resp = post(gateway, "/api/v1/fraud", body)
    assert resp.status == 401
    assert resp.json() == {"code": 16, "message": "Jwt is missing"}
    assert resp.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("case", "status", "message"), [
    ("expired", 401, "Jwt is expired"),
    # Envoy reports a missing `exp` (require_expiration) and a lifetime over max_lifetime
    # with its generic verification message; the same token with a short `exp` passes.
    ("no_exp", 401, "Jwt verification fails"),
    ("wrong_audience", 403, "Audiences in Jwt are not allowed"),
    ("wrong_issuer", 401, "Jwt issuer is not configured"),
    ("other_key", 401, "Jwks doesn't have key to match kid or alg from Jwt"),
    ("other_key_same_kid", 401, "Jwt verification fails"),
    ("hs256_with_public_key", 401, "Jwks doesn't have key to match kid or alg from Jwt"),
    ("alg_none", 401, "Jwt is not in the form of Header.Payload.Signature"),
    ("alg_none_with_signature", 401, "Jwt header [alg] is not supported"),
    ("lifetime_over_max", 401, "Jwt verification fails"),
    ("not_yet_valid", 401, "Jwt not yet valid"),
    ("garbage", 401, "Jwt is not in the form of Header.Payload.Signature"),
    ("tampered", 401, "Jwt verification fails"),
])
def test_bad_tokens_are_refused_with_a_specific_message(gateway, bad_tokens, body, case, status, message):
    resp = post(gateway, "/api/v1/fraud", body, token=bad_tokens[case])
    assert resp.status == status, (case, resp.body)
    err = resp.json()
    assert err["code"] == (7 if status == 403 else 16)
    assert message in err["message"], (case, err)


def test_token_in_the_query_string_only_is_401(gateway, token, body):
    resp = post(gateway, f"/api/v1/fraud?access_token={token()}", body)
    assert resp.status == 401
    assert resp.json()["message"] == "Jwt is missing"


def test_token_without_the_bearer_prefix_is_401(gateway, token, body):
    resp = post(gateway, "/api/v1/fraud", body, headers={"authorization": token()})
    assert resp.status == 401
    assert resp.json()["message"] == "Jwt is missing"


def test_grpc_without_token_is_unauthenticated(gateway_channel, fraud_features):
    stub = rpc.FraudServiceStub(gateway_channel)
    err = rpc_error(stub.Predict, pb.PredictRequest(transaction=pb.Transaction(features=fraud_features[0])),
                    timeout=5)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "Jwt is missing"


def test_grpc_wrong_audience_is_permission_denied(gateway_channel, bad_tokens, fraud_features):
    stub = rpc.FraudServiceStub(gateway_channel)
    err = rpc_error(stub.Predict, pb.PredictRequest(transaction=pb.Transaction(features=fraud_features[0])),
                    metadata=bearer(bad_tokens["wrong_audience"]), timeout=5)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "Audiences in Jwt are not allowed"


def test_grpc_stream_without_token_is_unauthenticated(gateway_channel, fraud_features):
    stub = rpc.FraudServiceStub(gateway_channel)
    requests = iter([pb.PredictRequest(transaction=pb.Transaction(features=fraud_features[0]))])
    err = rpc_error(lambda: list(stub.StreamPredict(requests, timeout=5)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_endpoint_needs_no_token_but_models_do(gateway):
    assert http("GET", f"http://{gateway.target}/healthz").status == 200
    assert http("POST", f"http://{gateway.target}/api/v1/fraud:batch", b"{}").status == 401
