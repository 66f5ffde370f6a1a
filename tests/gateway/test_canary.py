"""Canary routing through the real Envoy (the k8s variant's `canary` values on local processes): the
`x-canary: true` header reaches only the canary, the weight splits the rest, and a canary with no
healthy host hands its share back to the stable replicas instead of failing it."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from mlplatform_gateway import auth

from tests.gateway.helpers import post
from tests.support.procs import GatewayProcess, ServiceProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def canary_replica(model_repository: Path):
    svc = ServiceProcess("fraud_service", "FRAUD_", env={"FRAUD_MODEL_REPOSITORY": str(model_repository),
                                                         "FRAUD_CACHE_ENABLED": "false"}).start()
    yield svc
    svc.stop()


def canary_gateway(stable: ServiceProcess, canary: ServiceProcess, key: auth.SigningKey, weight: int) -> GatewayProcess:
    overrides = {"canary": {"weight_percent": weight, "header": "x-canary", "host": "127.0.0.1",
                            "endpoints": {"fraud": [canary.target]}}}
    gw = GatewayProcess({"fraud": [stable.target]}, key.jwks_path, overrides).start()
    gw.wait_healthy(1, cluster="fraud_canary_pods")
    return gw


def upstreams(gw: GatewayProcess, send) -> Counter[str]:
    """Upstream hosts (access log) of the requests `send()` makes; every one must answer 200."""
    before = len(gw.access_log())
    statuses = send()
    assert set(statuses) == {200}, statuses
    deadline = time.monotonic() + 5
    while len(gw.access_log()) < before + len(statuses) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = gw.access_log()[before:]
    assert len(lines) == len(statuses)
    return Counter(line["upstream_host"] for line in lines)


def predict(gw: GatewayProcess, token: str, features: list[float], n: int, canary: bool) -> list[int]:
    headers = {"x-canary": "true"} if canary else {}
    return [post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": f"c{i}", "features": features}},
                 token=token, headers=headers).status for i in range(n)]


def test_weight_splits_unmarked_traffic(fraud_service, canary_replica, signing_key, token, fraud_features):
    gw = canary_gateway(fraud_service, canary_replica, signing_key, weight=50)
    try:
        t = token(tier="internal")
        hosts = upstreams(gw, lambda: predict(gw, t, fraud_features[0], 100, canary=False))
        assert set(hosts) == {fraud_service.target, canary_replica.target}
        assert min(hosts.values()) >= 20, hosts  # 50/50 over 100 calls: below 20 has odds ~1e-9
    finally:
        gw.stop()


def test_header_reaches_only_the_canary_and_falls_back_to_stable_without_one(
        fraud_service, canary_replica, signing_key, token, fraud_features):
    gw = canary_gateway(fraud_service, canary_replica, signing_key, weight=0)
    try:
        t = token(tier="internal")
        assert upstreams(gw, lambda: predict(gw, t, fraud_features[0], 10, canary=False)) == {
            fraud_service.target: 10}
        assert upstreams(gw, lambda: predict(gw, t, fraud_features[0], 10, canary=True)) == {
            canary_replica.target: 10}
        canary_replica.stop()
        gw.wait_healthy(0, cluster="fraud_canary_pods")
        # No healthy canary host: the aggregate cluster's second priority, the stable replicas, answers.
        assert upstreams(gw, lambda: predict(gw, t, fraud_features[0], 10, canary=True)) == {
            fraud_service.target: 10}
    finally:
        gw.stop()
