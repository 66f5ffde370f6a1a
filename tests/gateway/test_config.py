"""The gateway config: every variant renders and Envoy itself accepts it; the renderer's pure logic."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import yaml
from mlplatform_gateway import auth, render, tls
from mlplatform_gateway.__main__ import parse_set
from mlplatform_gateway.local import prepare_files_dir

from tests.support.procs import ROOT


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gateway-files")
    return prepare_files_dir(d, auth.ensure_dev_keys(d / "keys").jwks_path)


def listener_filters(config: dict) -> list[str]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [f["name"] for f in hcm["http_filters"]]


def clusters(config: dict) -> dict[str, dict]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


@pytest.mark.parametrize("variant", render.VARIANTS)
def test_every_variant_is_accepted_by_envoy(variant, files_dir, tmp_path):
    """`envoy --mode validate` on each rendered variant; containers' /etc/envoy is pointed at local copies."""
    path = tmp_path / f"envoy-{variant}.yaml"
    certs = tls.ensure_dev_tls(tmp_path)  # compose / k8s read theirs from a mount / Secret
    overrides = {"files_dir": str(files_dir), "tls": {"dir": str(certs.directory)}, "secrets_dir": str(tmp_path)}
    path.write_text(render.render(variant, overrides))
    written = render.write_secrets(variant, overrides)  # the listener's certificate, through SDS (TLS: compose, k8s)
    assert [p.name for p in written] == ([] if variant == "local" else ["sds-listener-certificate.yaml"])
    render.validate(path)


def test_validate_reports_envoys_own_error(files_dir, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(render.render("local", {"files_dir": str(files_dir)}).replace("max_dynamic_descriptors",
                                                                                  "max_dynamic_descriptorz"))
    with pytest.raises(render.GatewayConfigError, match="max_dynamic_descriptorz"):
        render.validate(path)


def test_the_filter_chain_is_the_same_in_every_variant(files_dir):
    chains = {v: listener_filters(yaml.safe_load(render.render(v, {"files_dir": str(files_dir)})))
              for v in render.VARIANTS}
    assert chains["local"] == [
        "envoy.filters.http.health_check", "envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn",
        "envoy.filters.http.buffer", "envoy.filters.http.grpc_json_transcoder", "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.router"]
    assert chains["compose"] == chains["local"]
    # Kubernetes counts globally (every gateway replica asks the rate-limit service), same place in the chain.
    assert chains["k8s"] == [f.replace("local_ratelimit", "ratelimit") for f in chains["local"]]


def test_variants_differ_in_addresses_jwks_and_limit_sharing(files_dir):
    local, compose, k8s = (yaml.safe_load(render.render(v, {"files_dir": str(files_dir)})) for v in render.VARIANTS)
    addr = lambda cfg: cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["address"]  # noqa: E731
    assert (addr(local), addr(compose), addr(k8s)) == ("127.0.0.1", "0.0.0.0", "0.0.0.0")
    for cfg in (local, compose, k8s):
        assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"  # admin on loopback only

    def endpoint(cfg: dict) -> tuple[str, int]:
        ep = clusters(cfg)["fraud"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        sock = ep["address"]["socket_address"]
        return sock["address"], sock["port_value"]

    assert endpoint(local) == ("127.0.0.1", 50051) and clusters(local)["fraud"]["type"] == "STATIC"
    assert endpoint(compose) == ("fraud", 50051) and clusters(compose)["fraud"]["type"] == "STRICT_DNS"
    assert endpoint(k8s) == ("fraud-headless.mlplatform.svc.cluster.local", 50051)
    provider = lambda cfg: _jwt_provider(cfg)  # noqa: E731
    assert provider(local)["local_jwks"] == {"filename": f"{files_dir}/jwks.json"}
    assert provider(k8s)["remote_jwks"]["http_uri"]["uri"] == "https://auth.example.com/.well-known/jwks.json"
    assert "jwks" in clusters(k8s) and "transport_socket" in clusters(k8s)["jwks"]
    assert "local_cluster_name" not in local.get("cluster_manager", {})
    assert clusters(k8s)["ratelimit"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "ratelimit.mlplatform.svc.cluster.local", "port_value": 8081}}}
    assert "ratelimit" not in clusters(local) and "fraud_canary" not in clusters(local)


def _hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_k8s_global_rate_limit_sends_the_same_descriptors_as_the_local_limit(files_dir):
    local, k8s = (yaml.safe_load(render.render(v, {"files_dir": str(files_dir)})) for v in ("local", "k8s"))
    local_filter = next(f for f in _hcm(local)["http_filters"] if f["name"].endswith("local_ratelimit"))
    global_filter = next(f for f in _hcm(k8s)["http_filters"] if f["name"] == "envoy.filters.http.ratelimit")
    cfg = global_filter["typed_config"]
    assert cfg["domain"] == "mlplatform" and cfg["request_type"] == "both"
    assert cfg["rate_limit_service"]["grpc_service"] == {"envoy_grpc": {"cluster_name": "ratelimit"}}
    assert cfg["rate_limited_as_resource_exhausted"] is True
    vh_limits = _hcm(k8s)["route_config"]["virtual_hosts"][0]["rate_limits"]
    # (tier, api_key) exactly as the local filter builds it, plus (tier) alone for unlisted tiers.
    assert vh_limits[0]["actions"] == local_filter["typed_config"]["rate_limits"][0]["actions"]
    assert vh_limits[1]["actions"] == vh_limits[0]["actions"][:1]


def _upstream_routes(cfg: dict) -> list[dict]:
    """The routes to upstreams (the refusals before them: tests/gateway/test_model_control.py)."""
    return [r for r in _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]


def test_k8s_sends_nothing_to_the_canary_unless_a_route_says_so(files_dir):
    k8s = yaml.safe_load(render.render("k8s", {"files_dir": str(files_dir)}))
    routes = _upstream_routes(k8s)
    assert not [r for r in routes if "headers" in r["match"]]  # no tester route outside a rollout
    assert {r["route"]["cluster"] for r in routes} == {"fraud", "cnn", "sentiment", "generic"}
    canary = clusters(k8s)["fraud_canary"]
    assert canary["cluster_type"]["typed_config"]["clusters"] == ["fraud_canary_pods", "fraud"]
    pods = clusters(k8s)["fraud_canary_pods"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert pods["address"]["socket_address"]["address"] == "fraud-canary-headless.mlplatform.svc.cluster.local"
    assert clusters(k8s)["fraud_canary_pods"]["health_checks"] == clusters(k8s)["fraud"]["health_checks"]


def test_k8s_canary_weights_and_tester_routes_per_service(files_dir):
    routes_state = {"fraud": {"weight_percent": 5, "testers": True, "origin": "HTTPRoute mlplatform/fraud"},
                    "cnn": {"weight_percent": 100, "testers": False}}
    k8s = yaml.safe_load(render.render("k8s", {"files_dir": str(files_dir), "canary": {"routes": routes_state}}))
    routes = _upstream_routes(k8s)
    header_routes = [r for r in routes if "headers" in r["match"]]
    # Only fraud's testers: its streaming method and its service prefix, before every unmarked route.
    assert [r["match"].get("path") or r["match"]["prefix"] for r in header_routes] == [
        "/fraud.v1.FraudService/StreamPredict", "/fraud.v1.FraudService/"]
    assert all(r["route"]["cluster"] == "fraud_canary" for r in header_routes)
    assert all(r["match"]["headers"] == [{"name": "x-canary", "string_match": {"exact": "true"}}]
               for r in header_routes)
    assert routes.index(header_routes[-1]) < min(routes.index(r) for r in routes if "headers" not in r["match"])
    split = next(r for r in routes if r["match"] == {"prefix": "/fraud.v1.FraudService/"})
    assert split["route"]["weighted_clusters"]["clusters"] == [{"name": "fraud", "weight": 95},
                                                               {"name": "fraud_canary", "weight": 5}]
    cnn = next(r for r in routes if r["match"] == {"prefix": "/cnn.v1.CnnService/"})
    assert cnn["route"]["cluster"] == "cnn_canary"  # 100 %: the canary (its pods, else the stable ones)
    sentiment = next(r for r in routes if r["match"] == {"prefix": "/sentiment.v1.SentimentService/"})
    assert sentiment["route"]["cluster"] == "sentiment"


def test_routes_file_moves_the_route_table_to_rds(files_dir, tmp_path):
    overrides = {"files_dir": str(files_dir), "canary": {"routes_file": str(tmp_path / "routes" / "routes.yaml"),
                                                         "routes": {"fraud": {"weight_percent": 30}}}}
    bootstrap = yaml.safe_load(render.render("k8s", overrides))
    hcm = _hcm(bootstrap)
    assert "route_config" not in hcm
    assert hcm["rds"]["config_source"]["path_config_source"] == {
        "path": str(tmp_path / "routes" / "routes.yaml"), "watched_directory": {"path": str(tmp_path / "routes")}}
    rds = yaml.safe_load(render.render_routes("k8s", overrides, origin="test"))
    inline_overrides = {**overrides, "canary": {"routes": {"fraud": {"weight_percent": 30}}}}
    inline = yaml.safe_load(render.render("k8s", inline_overrides))
    table = rds["resources"][0]
    assert table.pop("@type") == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert table == _hcm(inline)["route_config"]  # the same table, only moved
    with pytest.raises(render.GatewayConfigError, match="absolute path"):
        render.render("k8s", {"files_dir": str(files_dir), "canary": {"routes_file": "routes.yaml"}})


def _jwt_provider(cfg: dict) -> dict:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    jwt_filter = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn")
    return jwt_filter["typed_config"]["providers"]["mlplatform"]


def test_security_settings_of_the_jwt_provider(files_dir):
    p = _jwt_provider(yaml.safe_load(render.render("local", {"files_dir": str(files_dir)})))
    assert p["from_headers"] == [{"name": "Authorization", "value_prefix": "Bearer "}]
    assert "from_params" not in p  # no ?access_token=
    assert p["require_expiration"] is True and p["max_lifetime"] == "86400s"
    assert p["forward"] is False
    assert (p["issuer"], p["audiences"]) == ("mlplatform-dev", ["mlplatform-api"])


def test_upstream_cluster_health_and_resilience_settings(files_dir):
    c = clusters(yaml.safe_load(render.render("local", {"files_dir": str(files_dir)})))["fraud"]
    hc = c["health_checks"][0]
    assert hc["grpc_health_check"] == {"service_name": "fraud.v1.FraudService"}
    assert hc["no_traffic_interval"] == hc["interval"] == "1s"
    assert c["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert c["outlier_detection"]["consecutive_gateway_failure"] == 3
    assert c["circuit_breakers"]["thresholds"][0]["max_requests"] == 4096
    http2 = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http2["explicit_http_config"]


def test_streaming_routes_have_no_overall_timeout(files_dir):
    cfg = yaml.safe_load(render.render("local", {"files_dir": str(files_dir)}))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {json.dumps(r["match"]): r["route"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
              if "route" in r}
    stream = routes['{"path": "/fraud.v1.FraudService/StreamPredict"}']
    unary = routes['{"prefix": "/fraud.v1.FraudService/"}']
    assert stream["timeout"] == "0s" and stream["idle_timeout"] == "300s"
    assert unary["timeout"] == "15s" and unary["retry_policy"]["per_try_timeout"] == "2s"
    # Per service: the per-try timeout is how long a call stuck on a hung replica waits before its retry, and the
    # deadline each attempt carries; sentiment's largest legal request takes longer than the others'.
    per_try = {m["prefix"].strip("/").split(".")[0]: r["retry_policy"]["per_try_timeout"]
               for m, r in ((json.loads(k), v) for k, v in routes.items()) if "prefix" in m and "retry_policy" in r}
    assert per_try == {"fraud": "2s", "cnn": "2s", "sentiment": "4s", "inference": "2s"}, per_try
    assert "unavailable" in unary["retry_policy"]["retry_on"]
    # Overload refusals are never retried (it would multiply the load on an overloaded service).
    assert "resource-exhausted" not in unary["retry_policy"]["retry_on"]
    # The deadline reaches the service: grpc-timeout rewritten per attempt (needs max_grpc_timeout, see the template).
    assert unary["max_grpc_timeout"] == "15s" and "max_stream_duration" not in unary


def test_replica_endpoints_and_tracing_overrides(files_dir):
    cfg = yaml.safe_load(render.render("local", {
        "files_dir": str(files_dir),
        "upstreams": {"endpoints": {"fraud": ["127.0.0.1:6001", "127.0.0.1:6002"]}},
        "tracing": {"otlp_endpoint": "http://collector:4317"},
    }))
    eps = clusters(cfg)["fraud"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps] == [6001, 6002]
    collector = clusters(cfg)["otel_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert collector["endpoint"]["address"]["socket_address"] == {"address": "collector", "port_value": 4317}


def test_tracing_is_off_without_an_endpoint(files_dir, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    cfg = yaml.safe_load(render.render("local", {"files_dir": str(files_dir)}))
    assert "otel_collector" not in clusters(cfg)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert "otel_collector" in clusters(yaml.safe_load(render.render("local", {"files_dir": str(files_dir)})))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"files_dir": None}, "files_dir is not set"),
    ({"rate_limit": {"methods": {"nope.v1.Nope/Predict": {"standard": 1}}}}, "unknown services"),
    ({"auth": {"jwks": {"file": None, "uri": "ftp://x/jwks"}}}, "http(s) URL"),
    ({"auth": {"issuer": ""}}, "auth.issuer"),
    ({"rate_limit": {"share_across_gateway_replicas": True}}, "gateway_peers"),
    ({"rate_limit": {"global_service": {"host": "rl", "port": 8081, "domain": "d", "timeout_ms": 50,
                                        "failure_mode_deny": False},
                     "methods": {"fraud.v1.FraudService/PredictBatch": {"standard": 20}}}}, "cannot be combined"),
    ({"canary": {"weight_percent": 120, "header": "x-canary", "claim": "c", "host": "{name}-canary"}},
     "weight_percent"),
    ({"canary": {"header": "x-canary", "claim": "c", "host": "{name}-canary",
                 "routes": {"fraud": {"weight_percent": 5.5}}}}, "canary weight of fraud"),
    ({"timeouts": {"per_try_s_by_service": {"frod": 3}}}, "timeouts.per_try_s_by_service names unknown services: "
                                                           "['frod']"),
])
def test_bad_values_are_refused_with_a_reason(files_dir, overrides, message):
    with pytest.raises(render.GatewayConfigError, match=re.escape(message)):
        render.render("local", {"files_dir": str(files_dir), **overrides})


def test_unknown_variant_is_refused():
    with pytest.raises(render.GatewayConfigError, match="unknown variant 'prod'"):
        render.load_values("prod")


def test_deep_merge_and_set_parsing():
    assert render.deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 3}, "d": [2]}) == {
        "a": {"b": 3, "c": 2}, "d": [2]}
    assert parse_set(["rate_limit.requests_per_minute=50", "upstreams.endpoints.fraud=[a:1, b:2]"]) == {
        "rate_limit": {"requests_per_minute": 50}, "upstreams": {"endpoints": {"fraud": ["a:1", "b:2"]}}}
    with pytest.raises(SystemExit):
        parse_set(["novalue"])


@pytest.mark.parametrize(("value", "expected"), [
    ("10.0.0.1:50051", ("10.0.0.1", 50051)), ("fraud", ("fraud", 7)), ("http://otel:4317", ("otel", 4317)),
    ("https://otel", ("otel", 7)),
])
def test_parse_endpoint(value, expected):
    assert render.parse_endpoint(value, 7) == expected


def test_dev_keys_are_private_stable_and_published_as_jwks(tmp_path):
    key = auth.ensure_dev_keys(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / auth.PRIVATE_KEY_FILE).st_mode)
    assert mode == 0o600
    assert auth.ensure_dev_keys(tmp_path).kid == key.kid  # reused, not regenerated
    jwks = json.loads(key.jwks_path.read_text())
    assert jwks["keys"] == [auth.public_jwk(key.private_key)]
    assert "d" not in jwks["keys"][0]  # no private part


def test_minted_token_carries_the_claims_the_gateway_checks(tmp_path):
    key = auth.ensure_dev_keys(tmp_path)
    token = auth.mint_token(key, "alice", ttl_s=120, tier="pro", now=1_000_000)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": key.kid, "typ": "JWT"}
    claims = jwt.decode(token, key.private_key.public_key(), algorithms=["RS256"], audience="mlplatform-api",
                        options={"verify_exp": False})
    assert claims == {"iss": "mlplatform-dev", "aud": "mlplatform-api", "sub": "alice", "tier": "pro",
                      "iat": 1_000_000, "exp": 1_000_120}
    with pytest.raises(ValueError, match="sub"):
        auth.mint_token(key, "")
    with pytest.raises(ValueError, match="ttl_s"):
        auth.mint_token(key, "bob", ttl_s=0)


def test_cli_renders_validates_and_prints_tokens(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "k8s.yaml"
    proc = subprocess.run([sys.executable, "-m", "mlplatform_gateway", "--key-dir", str(tmp_path / "keys"),
                           "render", "--variant", "k8s", "--validate", "--out", str(out),
                           "--set", "canary.weight_percent=10"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "envoy accepts the k8s config" in proc.stderr
    assert "/etc/envoy/descriptors.pb" in out.read_text()
    assert "{name: fraud, weight: 90}" in out.read_text()
    token = subprocess.run([sys.executable, "-m", "mlplatform_gateway", "--key-dir", str(tmp_path / "keys"),
                            "token", "--sub", "carol"], capture_output=True, text=True, timeout=30, check=True)
    assert jwt.decode(token.stdout.strip(), options={"verify_signature": False})["sub"] == "carol"


def test_retry_after_of_a_rate_limited_request_follows_the_slowest_bucket():
    rate_limit = {"tiers": {"standard": 100, "pro": 1000}, "unlisted_tier_requests_per_minute": 100, "methods": {}}
    assert render.retry_after_s(rate_limit) == 1
    rate_limit["methods"] = {"fraud.v1.FraudService/PredictBatch": {"standard": 20}}
    assert render.retry_after_s(rate_limit) == 3
