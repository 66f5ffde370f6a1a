"""Canary routing through the real Envoy (the k8s variant's `canary` values on local processes): only a
verified token with `canary_tester: true` reaches only the canary (the gateway sets `x-canary` from that claim
and drops the header when a client sends it), the weight splits the rest, and a canary with no healthy host
hands its share back to the stable replicas instead of failing it."""

from __future__ import annotations

import functools
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import auth, render

from tests.fraud.helpers import tx
from tests.gateway.helpers import bearer, post
from tests.support.procs import GatewayProcess, ServiceProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def canary_replica(model_repository: Path):
    svc = ServiceProcess("fraud_service", "FRAUD_", env={"FRAUD_MODEL_REPOSITORY": str(model_repository),
                                                         "FRAUD_CACHE_ENABLED": "false"}).start()
    yield svc
    svc.stop()


def canary_gateway(stable: ServiceProcess, canary: ServiceProcess, key: auth.SigningKey, weight: int) -> GatewayProcess:
    k8s = render.load_values("k8s")["canary"]
    overrides = {"canary": {"weight_percent": weight, "testers": True, "header": k8s["header"], "claim": k8s["claim"],
                            "host": "127.0.0.1", "endpoints": {"fraud": [canary.target]}}}
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
    """REST calls; `canary`: with the client's own `x-canary: true` header."""
    headers = {"x-canary": "true"} if canary else {}
    return [post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": f"c{i}", "features": features}},
                 token=token, headers=headers).status for i in range(n)]


def grpc_predict(gw: GatewayProcess, token: str, features: list[float], n: int, canary: bool) -> list[int]:
    """Native gRPC calls (unary, and one bidi stream per call of `n` messages); `canary`: with the client's own
    `x-canary: true` metadata. 200 per call that succeeded, as in the access log."""
    metadata = [*bearer(token), *([("x-canary", "true")] if canary else [])]
    with grpc.insecure_channel(gw.target) as channel:
        stub = rpc.FraudServiceStub(channel)
        for i in range(n):
            stub.Predict(pb.PredictRequest(transaction=tx(features, f"g{i}")), metadata=metadata, timeout=5)
        answers = list(stub.StreamPredict(iter([pb.PredictRequest(transaction=tx(features, f"s{i}"))
                                                for i in range(n)]), metadata=metadata, timeout=10))
    assert len(answers) == n
    return [200] * (n + 1)


def test_weight_splits_unmarked_traffic(fraud_service, canary_replica, signing_key, token, fraud_features):
    gw = canary_gateway(fraud_service, canary_replica, signing_key, weight=50)
    try:
        t = token(tier="internal")
        hosts = upstreams(gw, lambda: predict(gw, t, fraud_features[0], 100, canary=False))
        assert set(hosts) == {fraud_service.target, canary_replica.target}
        assert min(hosts.values()) >= 20, hosts  # 50/50 over 100 calls: below 20 has odds ~1e-9
    finally:
        gw.stop()


def test_only_a_tester_token_reaches_the_canary_rest_and_grpc(
        fraud_service, canary_replica, signing_key, token, fraud_features):
    """A client's own `x-canary: true` is dropped (any token holder could pick the canary otherwise); a token
    minted with `canary_tester: true` (`make token SUB=alice TESTER=1`) reaches only the canary, whatever
    header it sends, over REST and native gRPC (unary and stream: the route is chosen again after jwt_authn
    has set the header, also for gRPC, which no transcoder re-routes); `canary_tester: false` is a normal token."""
    gw = canary_gateway(fraud_service, canary_replica, signing_key, weight=0)
    stable, canary = {fraud_service.target}, {canary_replica.target}
    try:
        normal = token(tier="internal")
        tester = token(tier="internal", canary_tester=True)
        not_tester = token(tier="internal", extra={auth.CANARY_TESTER_CLAIM: False})
        cases = [(normal, False, stable), (normal, True, stable), (not_tester, True, stable),
                 (tester, False, canary), (tester, True, canary)]
        for send in (predict, grpc_predict):
            for t, header, want in cases:
                hosts = upstreams(gw, functools.partial(send, gw, t, fraud_features[0], 5, canary=header))
                assert set(hosts) == want, (send.__name__, header)
    finally:
        gw.stop()


def test_tester_falls_back_to_stable_without_a_healthy_canary(
        fraud_service, canary_replica, signing_key, token, fraud_features):
    gw = canary_gateway(fraud_service, canary_replica, signing_key, weight=0)
    try:
        tester = token(tier="internal", canary_tester=True)
        assert upstreams(gw, lambda: predict(gw, tester, fraud_features[0], 10, canary=False)) == {
            canary_replica.target: 10}
        canary_replica.stop()
        gw.wait_healthy(0, cluster="fraud_canary_pods")
        # No healthy canary host: the aggregate cluster's second priority, the stable replicas, answers.
        assert upstreams(gw, lambda: predict(gw, tester, fraud_features[0], 10, canary=False)) == {
            fraud_service.target: 10}
    finally:
        gw.stop()


def test_k8s_variant_drops_the_client_header_before_routing_and_sets_it_from_the_claim():
    """The rendered k8s config: the header filter that drops `x-canary` runs before jwt_authn, which alone
    sets it (from the claim `make token TESTER=1` mints) and re-selects the route; the canary routes match it."""
    canary = render.load_values("k8s")["canary"]
    assert canary["claim"] == auth.CANARY_TESTER_CLAIM
    config = yaml.safe_load(render.render("k8s", {"canary": {"testers": True}}))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    mutation = hcm["http_filters"][names.index("envoy.filters.http.header_mutation")]["typed_config"]
    assert {"remove": canary["header"]} in mutation["mutations"]["request_mutations"]
    jwt = hcm["http_filters"][names.index("envoy.filters.http.jwt_authn")]["typed_config"]["providers"]["mlplatform"]
    assert names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.jwt_authn")
    assert {"header_name": canary["header"], "claim_name": canary["claim"]} in jwt["claim_to_headers"]
    assert jwt["clear_route_cache"] is True
    header_routes = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
                     if "headers" in r["match"] and "route" in r]  # not the OpenAPI document's GET
    match = [{"name": canary["header"], "string_match": {"exact": "true"}}]
    assert header_routes and all(r["match"]["headers"] == match and r["route"]["cluster"].endswith("_canary")
                                 for r in header_routes)


def test_token_command_mints_a_tester_token_only_when_asked(tmp_path, capsys):
    """`make token SUB=alice TESTER=1` runs `python -m mlplatform_gateway token --sub alice --canary-tester`."""
    import jwt
    from mlplatform_gateway.__main__ import main

    claims = []
    for extra in ([], ["--canary-tester"]):
        assert main(["--key-dir", str(tmp_path), "token", "--sub", "alice", *extra]) == 0
        claims.append(jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False}))
    assert auth.CANARY_TESTER_CLAIM not in claims[0]
    assert claims[1][auth.CANARY_TESTER_CLAIM] is True and claims[1]["sub"] == "alice"
