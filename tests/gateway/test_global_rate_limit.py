"""The Kubernetes gateway's global rate limit through the real Envoy: the `ratelimit` filter sends the
verified token's (tier, api_key) and (tier) descriptors to a rate-limit service, and the limits of the
generated envoyproxy/ratelimit config hold: 100 per minute per key, per key, fail-open when the service
is down. (The service here applies that config as envoyproxy/ratelimit does: tests/support/ratelimit.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import yaml
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc

from tests.gateway.helpers import bearer, post, rpc_error
from tests.support.procs import ROOT, GatewayProcess
from tests.support.ratelimit import RateLimitServer, find_limit

pytestmark = pytest.mark.integration

CONFIG = yaml.safe_load((ROOT / "k8s" / "base" / "platform" / "ratelimit" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def rls() -> Iterator[RateLimitServer]:
    server = RateLimitServer(CONFIG).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def global_gateway(fraud_service, signing_key, rls) -> Iterator[GatewayProcess]:
    """The local gateway with the k8s variant's rate-limit values, pointed at the loopback service."""
    overrides = {"rate_limit": {"global_service": {"host": "127.0.0.1", "port": rls.port, "domain": CONFIG["domain"],
                                                   "timeout_ms": 1000, "failure_mode_deny": False}}}
    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path, overrides).start()
    yield gw
    gw.stop()


def call(gw: GatewayProcess, token: str, features: list[float], tx: str = "tx-rl") -> int:
    return post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": tx, "features": features}}, token=token).status


def test_config_matching_follows_the_tiers():
    assert find_limit(CONFIG, [("tier", "standard"), ("api_key", "a")])["requests_per_unit"] == 100
    assert find_limit(CONFIG, [("tier", "pro"), ("api_key", "a")])["requests_per_unit"] == 1000
    assert find_limit(CONFIG, [("tier", "standard")]) is None  # the per-tier bucket is for unlisted tiers only
    assert find_limit(CONFIG, [("tier", "gold")])["requests_per_unit"] == 100
    assert find_limit(CONFIG, [("tier", "gold"), ("api_key", "a")]) is None


def test_descriptors_come_from_the_verified_token(global_gateway, rls, token, fraud_features):
    before = len(rls.requests)
    assert call(global_gateway, token(sub="carol-rl", tier="pro"), fraud_features[0]) == 200
    assert call(global_gateway, token(sub="dave-rl"), fraud_features[0]) == 200  # no tier claim: standard
    assert rls.requests[before:] == [
        ("mlplatform", [[("tier", "pro"), ("api_key", "carol-rl")], [("tier", "pro")]]),
        ("mlplatform", [[("tier", "standard"), ("api_key", "dave-rl")], [("tier", "standard")]]),
    ]


def test_one_hundred_per_minute_per_key_then_429_and_resource_exhausted(global_gateway, token, fraud_features):
    if 60 - time.time() % 60 < 20:  # keep the burst inside one counting window
        time.sleep(60 - time.time() % 60 + 0.5)
    key = token(sub="erin-rl")
    statuses = [call(global_gateway, key, fraud_features[0], f"e{i}") for i in range(100)]
    assert statuses == [200] * 100
    over = post(global_gateway, "/api/v1/fraud", {"transaction": {"transaction_id": "e100",
                                                                   "features": fraud_features[0]}}, token=key)
    assert over.status == 429 and over.json()["code"] == 8
    with grpc.insecure_channel(global_gateway.target) as channel:
        err = rpc_error(rpc.FraudServiceStub(channel).Predict,
                        pb.PredictRequest(transaction=pb.Transaction(transaction_id="e101",
                                                                     features=fraud_features[0])),
                        metadata=bearer(key), timeout=10)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call(global_gateway, token(sub="frank-rl"), fraud_features[0]) == 200  # another key: its own count


def test_requests_pass_when_the_rate_limit_service_is_down(global_gateway, rls, token, fraud_features):
    rls.stop()
    assert call(global_gateway, token(sub="gina-rl"), fraud_features[0]) == 200  # failure_mode_deny: false
